"""Experiment behind `rlhfkit demo --preset personal`: what the toy policy's answers vary on, and
whether on-policy rounds of per-user DPO (+ NLL) teach two users' opposite tastes, for given settings.

    python benchmarks/personal_tastes.py --look                       # the base samples' spread
    python benchmarks/personal_tastes.py --read runs/demo-personal/report.json  # what the answers repeat
    python benchmarks/personal_tastes.py --pick 20,17 14,17           # the tastes on best-of-12 base samples
    python benchmarks/personal_tastes.py --lr 2e-3 --beta 0.1 --nll 1 --epochs 4 --rounds 4 --trace

Each run writes its report.json and curves.png under --run-dir (a fresh folder per run).
Results: benchmarks/results/personal_tastes.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
from collections import Counter
from pathlib import Path

import torch

from rlhfkit.demo import personal as demo
from rlhfkit.demo import tastes
from rlhfkit.demo.criteria import topic_words
from rlhfkit.demo.personal import PersonalDemoConfig, demo_task_prompts, run_personal_demo
from rlhfkit.demo.presets import DemoConfig, load_demo_policy
from rlhfkit.demo.tastes import TASTES, answers_question, words
from rlhfkit.eval.judges import SentimentJudge
from rlhfkit.eval.metrics import distinct_n
from rlhfkit.models.policy import completion_logits
from rlhfkit.personal import train
from rlhfkit.personal.models import PersonalModels
from rlhfkit.personal.train import PersonalDPOConfig, pair_batch, sequence_logprobs


def base_models(corpus_mix: bool) -> PersonalModels:
    """The personal demo's toy base (the polite assistant), or with ``corpus_mix`` the toy policy of the
    corpus's own mix (rude half the time), asked through its chat template."""
    toy = DemoConfig().toy_policy if corpus_mix else PersonalDemoConfig().toy_policy
    policy, tokenizer, _ = load_demo_policy(DemoConfig(toy_policy=toy), False)
    return PersonalModels(policy, tokenizer, Path("/tmp/personal-tastes-look"), use_chat_template=True)


def look(corpus_mix: bool, samples: int = 4) -> None:
    """Spread of the base policy's answers in words, sentiment, '!', '?', whether they answer the question
    (rlhfkit.demo.tastes.answers_question, 1 or 0) and insult (1 or 0) over the training prompts."""
    models = base_models(corpus_mix)
    train, _, _ = demo_task_prompts(PersonalDemoConfig())
    prompts = train[:24]
    answers = [models.answer(p, None, 1.0, 40, seed=s).text.strip() for p in prompts for s in range(samples)]
    keys = [p for p in prompts for _ in range(samples)]
    sentiment = SentimentJudge()(keys, answers).tolist()
    for name, values in {"words": [words(a) for a in answers], "sentiment": sentiment,
                         "answers": [int(answers_question(p, a)) for p, a in zip(keys, answers, strict=True)],
                         "insults": [int(tastes.insults(a)) for a in answers],
                         "exclamations": [a.count("!") for a in answers], "questions": [a.count("?") for a in answers]
                         }.items():
        q = statistics.quantiles(values, n=4)
        print(f"{name:>12}: mean {statistics.mean(values):.2f} sd {statistics.pstdev(values):.2f} "
              f"quartiles {[round(x, 2) for x in q]}")


def pick(enough: list[str], corpus_mix: bool, n: int = 12) -> None:
    """Before training anything: for each "BRIEF,DETAILED" pair of the tastes' thresholds (BRIEF_ENOUGH,
    DETAILED_ENOUGH), the best of ``n`` base samples by each taste (a stand-in for a model that learned it; one
    drawn at random among equal bests) vs 4 other base samples on the held-out prompts: win rate under its
    own taste (the ceiling of a model that learned it) and the other's (specificity), distinct-2 ÷ the shared
    samples', and among the pairs each taste makes of two base samples (noise and "both fine" as the demo's),
    the share of two answers it scores the same (a pair of noise)."""
    models = base_models(corpus_mix)
    _, held_out, topics = demo_task_prompts(PersonalDemoConfig())
    drawn = {q: [models.answer(q, None, 1.0, 40, seed=demo.draw_seed(0, i, s)).text for s in range(4 + n)]
             for i, q in enumerate(held_out)}
    keys = [q for q in held_out for _ in range(4)]
    shared = [drawn[q][s] for q in held_out for s in range(4)]
    print(f"shared samples: answer {statistics.mean(map(answers_question, keys, shared)):.2f}, insult "
          f"{statistics.mean(map(tastes.insults, shared)):.2f}, words {statistics.mean(map(words, shared)):.1f}")
    for thresholds in enough:
        tastes.BRIEF_ENOUGH, tastes.DETAILED_ENOUGH = map(int, thresholds.split(","))  # the tastes read them per call
        for taste, other in ((TASTES["brief"], TASTES["detailed"]), (TASTES["detailed"], TASTES["brief"])):
            rng = random.Random(0)
            best = []
            for q in keys:
                top = max(taste.score(q, a) for a in drawn[q][4:])
                best.append(rng.choice([a for a in drawn[q][4:] if taste.score(q, a) == top]))
            own, theirs = (demo.win_rate([t.score(q, a) for q, a in zip(keys, best, strict=True)],
                                         [t.score(q, a) for q, a in zip(keys, shared, strict=True)], keys, topics)
                           for t in (taste, other))
            made = [(q, drawn[q][i], drawn[q][i + 1]) for q in held_out for i in range(0, 4 + n - 1, 2)]
            made = [(q, a, b) for q, a, b in made if taste.choose(q, [a, b], rng) in ("a", "b")]
            same = statistics.mean(taste.score(q, a) == taste.score(q, b) for q, a, b in made)
            print(f"enough {thresholds}: {taste.user:>8}'s best of {n}: own taste {own[0]:.2f} [{own[1]:.2f}, "
                  f"{own[2]:.2f}], {other.user}'s {theirs[0]:.2f} [{theirs[1]:.2f}, {theirs[2]:.2f}], distinct-2 "
                  f"{distinct_n(best, 2) / distinct_n(shared, 2):.2f}x, {len(made)} pairs of base samples, "
                  f"{same:.0%} of equal score")


def read(report: Path) -> None:
    """What a finished run's last-round answers (report.json's ``answers``) repeat, per model: how many different
    advice sentences (the second sentence, or the whole text, with the question's content words as X) and
    openers (the first sentence) among them, the most common of each, and how many answers insult."""
    finished = json.loads(report.read_text())
    answers, models = finished["answers"], ["shared", *finished["tastes"]]
    for column, model in enumerate(models, start=1):
        advice, openers = Counter(), Counter()
        for row in answers:
            sentences = [x.strip() for x in tastes.SENTENCE.findall(row[column])] or [row[column].strip()]
            text = (sentences[1] if len(sentences) > 1 else sentences[0]).lower()
            for word in topic_words(row[0]):
                text = re.sub(rf"\b{word}\b", "X", text)
            advice[text] += 1
            openers[sentences[0]] += 1
        (top, times), (opener, opened) = advice.most_common(1)[0], openers.most_common(1)[0]
        print(f"{model:>9}: {len(advice)} advice sentences in {len(answers)} answers (most common {times}×: {top!r}); "
              f"{len(openers)} openers (most common {opened}×: {opener!r}); "
              f"{sum(tastes.insults(row[column]) for row in answers)} insult")


def stop_logprobs(models: PersonalModels, adapter: str | None, pairs) -> dict:
    """Mean log π(EOS | x, y_≤t) of ``adapter`` over the chosen answers: at their end (whole answers only)
    and after every sentence end ('.', '!', '?') inside them."""
    batch = pair_batch(models, pairs, PersonalDPOConfig())
    half = len(pairs)
    eos = models.tokenizer.eos_token_id
    with torch.no_grad(), models.active(adapter):
        logits, _ = completion_logits(models.model, batch.to(next(models.model.parameters()).device))
    stop = torch.log_softmax(logits.float(), dim=-1)[..., eos][:half]  # position t: EOS as token t
    ids, mask = batch.completion_ids[:half], batch.completion_mask[:half]
    at_end, inside = [], []
    for row in range(half):
        n = int(mask[row].sum())
        whole = ids[row, n - 1].item() == eos
        if whole:
            at_end.append(stop[row, n - 1].item())
        for t in range(n - 1 - whole):
            if models.tokenizer.decode(ids[row, t]).strip() in (".", "!", "?"):
                inside.append(stop[row, t + 1].item())
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"eos_at_end": mean(at_end), "eos_after_sentence": mean(inside), "sentence_ends": len(inside)}


def trace(path: Path) -> None:
    """Write each training's pairs, history and stopping log-probs, and each evaluation's answer lengths, as
    JSON lines to ``path`` (``--trace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    train_version, answers = train.train_version, demo.PersonalDemo.answers

    def write(row: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def traced_train(models, owner, pairs, config, users=None):
        start = models.starting_point(owner)
        swapped = [p.model_copy(update={"chosen": p.rejected, "rejected": p.chosen, "chosen_truncated":
                                        p.rejected_truncated, "rejected_truncated": p.chosen_truncated})
                   for p in pairs]
        before, rejected_before = stop_logprobs(models, start, pairs), stop_logprobs(models, start, swapped)
        version, history = train_version(models, owner, pairs, config, users)
        adapter = models.adapter(owner)
        after, rejected_after = stop_logprobs(models, adapter, pairs), stop_logprobs(models, adapter, swapped)
        with torch.no_grad():
            tokens = pair_batch(models, pairs, config)
            with models.active(adapter):
                policy = sequence_logprobs(models, tokens)[0]
            with models.active(start):
                reference = sequence_logprobs(models, tokens)[0]
        ratio = (policy - reference).tolist()
        epoch = max(1, len(history) // config.epochs)
        write({"training": owner, "version": version, "pairs": len(pairs),
               "chosen_words": statistics.mean(words(p.chosen) for p in pairs),
               "rejected_words": statistics.mean(words(p.rejected) for p in pairs),
               "chosen_cut": statistics.mean(p.chosen_truncated for p in pairs),
               "rejected_cut": statistics.mean(p.rejected_truncated for p in pairs),
               "first_epoch": {k: statistics.mean(h[k] for h in history[:epoch]) for k in ("loss", "margin",
                                                                                          "accuracy")},
               "last_epoch": {k: statistics.mean(h[k] for h in history[-epoch:]) for k in ("loss", "margin",
                                                                                          "accuracy")},
               "chosen_logratio": statistics.mean(ratio[:len(pairs)]),
               "rejected_logratio": statistics.mean(ratio[len(pairs):]),
               "stop_before": before, "stop_after": after, "rejected_stop_before": rejected_before,
               "rejected_stop_after": rejected_after})
        return version, history

    def traced_answers(self, adapter, prompts, seeds=None):
        out = answers(self, adapter, prompts, seeds)
        write({"answers": adapter or "shared", "seeds": None if seeds is None else list(seeds),
               "words": statistics.mean(words(a.text) for a in out),
               "cut": statistics.mean(a.truncated for a in out), "first": [a.text for a in out[:3]]})
        return out

    train.train_version, demo.PersonalDemo.answers = traced_train, traced_answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--look", action="store_true")
    parser.add_argument("--read", type=Path, metavar="REPORT_JSON",
                        help="what a finished run's last-round answers repeat (advice sentences, openers)")
    parser.add_argument("--pick", nargs="+", metavar="BRIEF,DETAILED",
                        help="the tastes' best-of-12 base samples with these BRIEF_ENOUGH,DETAILED_ENOUGH")
    parser.add_argument("--corpus-mix", action="store_true",
                        help="--look/--pick on the toy policy of the corpus's own mix (rude half the time)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/personal-tastes"))
    parser.add_argument("--lr", type=float, default=PersonalDemoConfig().dpo.lr)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--nll", type=float, default=1.0)
    parser.add_argument("--kl", type=float, default=PersonalDemoConfig().dpo.kl_coef,
                        help="γ of the per-token KL to the starting point")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--nll-on-eos", action="store_true", help="the NLL term also on the chosen answer's EOS")
    parser.add_argument("--rounds", type=int, default=PersonalDemoConfig.rounds)
    parser.add_argument("--per-round", type=int, default=PersonalDemoConfig.prompts_per_round)
    parser.add_argument("--train-every", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--eval-prompts", type=int, default=PersonalDemoConfig.eval_prompts)
    parser.add_argument("--eval-samples", type=int, default=PersonalDemoConfig.eval_samples)
    parser.add_argument("--trace", action="store_true", help="also write trace.jsonl: each training's pairs, "
                        "DPO history, log π(EOS) at sentence ends before/after, each evaluation's lengths")
    parser.add_argument("--tastes", nargs="+", choices=sorted(TASTES), default=["brief", "detailed"])
    parser.add_argument("--population", action="store_true", help="a population adapter trained on everyone's "
                        "pairs after each round: the shared model, and the users' versions' start")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.read:
        return read(args.read)
    if args.look:
        return look(args.corpus_mix)
    if args.pick:
        return pick(args.pick, args.corpus_mix)
    if args.trace:
        trace(args.run_dir / "trace.jsonl")
    dpo = PersonalDPOConfig(lr=args.lr, beta=args.beta, nll_coef=args.nll, epochs=args.epochs,
                            nll_on_eos=args.nll_on_eos, kl_coef=args.kl)
    run_personal_demo(PersonalDemoConfig(run_dir=args.run_dir, rounds=args.rounds, prompts_per_round=args.per_round,
                                         train_every=args.train_every, seed=args.seed, dpo=dpo,
                                         max_new_tokens=args.max_new_tokens, eval_prompts=args.eval_prompts,
                                         eval_samples=args.eval_samples, population=args.population,
                                         tastes=[TASTES[t] for t in args.tastes]), progress=False)


if __name__ == "__main__":
    main()
