"""Constitutional AI's stages on tiny models: the data flow, resuming, position debiasing, SFT."""

import pytest
import torch

from conftest import build_tiny_causal, build_tiny_reward_backbone, build_tiny_seq2seq, minilm_tokenizer, word_tokenizer
from rlhfkit.cai.constitution import Constitution, Example
from rlhfkit.cai.critique import revise, revision_dry_run
from rlhfkit.cai.feedback import FeedbackConfig, ModelOptionScorer, comparison_dry_run, label_pairs
from rlhfkit.cai.sft import SFTConfig, mean_loss, train_sft
from rlhfkit.data.io import read_records
from rlhfkit.data.records import Completion, PreferencePair, Prompt, Revision, SamplingParams
from rlhfkit.generate import Samples
from rlhfkit.models.update import TrainingDiverged

# the word-level test vocabulary has no "A"/"B": answer with "a" and "i"
RULES = Constitution.model_validate({
    "principles": [{"name": "kind", "critique": "is it bad", "revision": "make it nice", "choose": "which is kind"},
                   {"name": "honest", "critique": "is it true", "revision": "make it good"},
                   {"name": "helpful", "critique": "does it help", "revision": "help more"}],
    "templates": {"options": ["a", "i"]},
})
PROMPTS = [Prompt(id=f"r{i}", text=t) for i, t in enumerate(["how do i fix bike", "what do you hate", "plan day"])]
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=5, seed=0)


def test_revise_keeps_every_step_draws_fresh_principles_and_resumes(tmp_path):
    out = tmp_path / "revisions.jsonl"
    records = revise(build_tiny_causal(), word_tokenizer(), PROMPTS, RULES, rounds=3, sampling=SAMPLING,
                     batch_size=2, use_chat_template=False, output=out, progress=False)
    assert [r.id for r in records] == ["r0", "r1", "r2"]
    for record in records:
        assert len(record.steps) == 3
        assert len({s.principle for s in record.steps}) == 3  # a fresh principle each round
        last = [s.revision for s in record.steps if s.revision]
        assert record.final == (last[-1] if last else record.initial)
        assert record.steps[0].critique_request == RULES.principle(record.steps[0].principle).critique
    assert read_records(out, Revision) == records
    again = revise(build_tiny_causal(), word_tokenizer(), PROMPTS, RULES, rounds=3, sampling=SAMPLING,
                   output=out, progress=False)
    assert again == [] and len(read_records(out, Revision)) == 3


def test_revision_dry_run_shows_the_strings_with_placeholders():
    shown = revision_dry_run(RULES, "how do i fix bike")
    assert list(shown.values()) == [
        "how do i fix bike",
        "Human: how do i fix bike\n\nAssistant: <initial response>\n\nCritiqueRequest: is it bad\n\nCritique:",
        "Human: how do i fix bike\n\nAssistant: <initial response>\n\nCritiqueRequest: is it bad\n\n"
        "Critique: <critique>\n\nRevisionRequest: make it nice\n\nRevision:"]


def completions(prompt_id, texts):
    return [Completion(id=f"{prompt_id}-{i}", prompt_id=prompt_id, prompt="help me", text=t, index=i)
            for i, t in enumerate(texts)]


def test_asking_in_both_orders_cancels_position_bias():
    first_always = lambda texts: torch.full((len(texts),), 0.9)  # noqa: E731 - prefers option A whatever it is
    pairs = label_pairs(completions("p", ["nice reply", "rude reply"]), RULES, first_always, progress=False)
    assert len(pairs) == 1 and pairs[0].label == pytest.approx(0.5)
    assert pairs[0].provenance["p_a_first"] == pytest.approx(0.9)
    assert pairs[0].provenance["p_a_second"] == pytest.approx(0.1)


def test_a_consistent_preference_becomes_a_soft_label_with_the_winner_first(tmp_path):
    def likes_nice(texts):  # P(A) is 0.8 when option A is the nice reply, 0.3 otherwise (plus position bias)
        return torch.tensor([0.8 if "(A) nice" in t else 0.3 for t in texts])

    out = tmp_path / "ai_pairs.jsonl"
    responses = completions("p", ["rude reply", "nice reply", "other reply"])
    pairs = label_pairs(responses, RULES, likes_nice, output=out, progress=False)
    assert len(pairs) == 3  # every two of three responses
    nice = [p for p in pairs if "nice reply" in (p.chosen, p.rejected)]
    assert all(p.chosen == "nice reply" and p.label == pytest.approx((0.8 + 0.7) / 2) for p in nice)
    assert label_pairs(responses, RULES, likes_nice, output=out, progress=False) == []  # resumed: all done
    assert read_records(out, PreferencePair) == pairs


def test_ai_feedback_pairs_carry_whether_each_answer_was_cut_at_the_generation_limit():
    likes_nice = lambda texts: torch.tensor([0.8 if "(A) nice" in t else 0.3 for t in texts])  # noqa: E731
    rude, nice = completions("p", ["rude reply", "nice reply"])
    [pair] = label_pairs([rude, nice.model_copy(update={"truncated": True})], RULES, likes_nice, progress=False)
    assert (pair.chosen, pair.chosen_truncated, pair.rejected_truncated) == ("nice reply", True, False)


def test_chain_of_thought_labels_are_clamped_to_the_band():
    model, tokenizer = build_tiny_causal(), word_tokenizer()
    confident = lambda texts: torch.tensor([0.99 if "(A) nice" in t else 0.01 for t in texts])  # noqa: E731
    config = FeedbackConfig(chain_of_thought=True, thought_tokens=3, use_chat_template=False)
    pairs = label_pairs(completions("p", ["nice reply", "rude reply"]), RULES, confident, config, model, tokenizer,
                        progress=False)
    assert pairs[0].chosen == "nice reply" and pairs[0].label == pytest.approx(0.6)


def test_model_scorer_reads_the_two_option_probabilities():
    model, tokenizer = build_tiny_causal(), word_tokenizer()
    scorer = ModelOptionScorer(model, tokenizer, ("a", "i"))
    p = scorer(["which is kind ( a", "help ("])
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    with pytest.raises(ValueError, match="two different tokens"):
        ModelOptionScorer(model, tokenizer, ("a", "a"))
    shown = comparison_dry_run(RULES, "help me", "x", "y")
    first, second = shown.values()
    assert first.endswith("(A) x\n(B) y\n\nThe answer is: (") and second.endswith("(A) y\n(B) x\n\nThe answer is: (")


@pytest.mark.parametrize(("build", "lora"), [(build_tiny_causal, False), (build_tiny_seq2seq, False),
                                             (build_tiny_causal, True)], ids=["causal", "seq2seq", "lora"])
def test_sft_lowers_the_loss_on_revisions(build, lora, tmp_path):
    examples = [("how do i fix bike", "you are doing great thanks for asking"),
                ("plan day", "happy to help with your plan"), ("bake cake", "great question glad you asked")]
    helpful = [("write code", "kind regards")] * 4
    config = SFTConfig(epochs=15, lr=3e-3, batch_size=2, lora=lora, use_chat_template=False, helpful_fraction=1.0)
    model, metrics = train_sft(build(), word_tokenizer(), examples, config, helpful=helpful,
                               output_dir=tmp_path / "sft", progress=False)
    assert metrics["loss_after"] < metrics["loss_before"] - (0.3 if lora else 1.0)  # nats per token
    assert metrics["helpful_examples"] == 3
    reloaded = type(model).from_pretrained(tmp_path / "sft")  # LoRA merged: a plain model
    assert mean_loss(reloaded, word_tokenizer(), examples, False, config) == pytest.approx(metrics["loss_after"],
                                                                                           rel=1e-4)


def test_sft_of_a_bf16_checkpoint_updates_float32_master_weights():
    examples = [("how do i fix bike", "you are doing great thanks for asking"), ("plan day", "happy to help")]
    config = SFTConfig(epochs=2, lr=1e-5, batch_size=2, use_chat_template=False)
    before = build_tiny_causal().to(torch.bfloat16)
    start = [p.detach().float().clone() for p in before.parameters()]
    model, _ = train_sft(before, word_tokenizer(), examples, config, progress=False)
    after = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in after)
    changed = sum(int((a.detach() != s).sum()) for a, s in zip(after, start, strict=True))
    assert changed / sum(s.numel() for s in start) > 0.5  # in pure bf16, most 1e-5 updates round away


def test_sft_stops_on_a_non_finite_loss_and_saves_nothing(tmp_path):
    model = build_tiny_causal()
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    config = SFTConfig(epochs=1, batch_size=2, use_chat_template=False)
    with pytest.raises(TrainingDiverged, match=r"SFT stopped in epoch 1: loss nan, .*not finite"):
        train_sft(model, word_tokenizer(), [("plan day", "happy to help")], config, output_dir=tmp_path / "sft",
                  progress=False)
    assert not (tmp_path / "sft" / "config.json").exists()


def test_sft_saves_a_model_whose_generation_config_transformers_would_refuse_to_save(tmp_path):
    model = build_tiny_causal()
    model.generation_config.top_p = 0.5  # without do_sample: transformers' strict check on save refuses it
    config = SFTConfig(epochs=1, batch_size=2, use_chat_template=False)
    train_sft(model, word_tokenizer(), [("plan day", "happy to help")], config, output_dir=tmp_path / "sft",
              progress=False)
    assert (tmp_path / "sft" / "model.safetensors").exists()


def test_rlaif_wires_responses_feedback_reward_model_and_ppo_and_resumes(tmp_path):
    from rlhfkit.cai.rlaif import RLAIFConfig, run_rlaif
    from rlhfkit.reward.model import RewardModel

    prompts = tmp_path / "red_team.txt"
    prompts.write_text("how do i fix bike\nwhat do you hate\nplan day\nhelp you\n")
    constitution = tmp_path / "c.yaml"
    constitution.write_text(RULES.model_dump_json())  # JSON is YAML
    config = RLAIFConfig(prompts=str(prompts), constitution=str(constitution), responses=3, max_new_tokens=5,
                         reward_epochs=1, ppo_steps=2, ppo_batch_size=4, ppo_lr=1e-3, output_dir=str(tmp_path / "run"))

    def run():
        return run_rlaif(config, policy=build_tiny_causal(), tokenizer=word_tokenizer(),
                         feedback=(build_tiny_causal(), word_tokenizer()),
                         reward_model=RewardModel(build_tiny_reward_backbone(), minilm_tokenizer(), max_length=32),
                         progress=False)

    summary = run()
    run_dir = tmp_path / "run"
    pairs = read_records(run_dir / "ai_pairs.jsonl", PreferencePair)
    assert summary["pairs"] == len(pairs) == 4 * 3  # 3 responses per prompt → 3 comparisons each
    assert all(0.5 <= p.label <= 1.0 and p.provenance["source"] == "ai_feedback" for p in pairs)
    assert summary["ppo_steps"] == 2 and (run_dir / "ppo" / "policy" / "config.json").exists()
    assert (run_dir / "reward_model" / "model.safetensors").exists()
    stamp = (run_dir / "ai_pairs.jsonl").stat().st_mtime_ns
    assert run()["ppo_steps"] == 2 and (run_dir / "ai_pairs.jsonl").stat().st_mtime_ns == stamp


def test_interrupted_sft_resumes_after_its_last_epoch_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    import rlhfkit.cai.sft as sft_module

    examples = [("how do i fix bike", "you are doing great thanks for asking"),
                ("plan day", "happy to help with your plan"), ("bake cake", "great question glad you asked")]
    config = SFTConfig(epochs=3, lr=3e-3, batch_size=2, use_chat_template=False)
    _, whole = train_sft(build_tiny_causal(), word_tokenizer(), examples, config, output_dir=tmp_path / "whole",
                         progress=False)

    real_loss, calls = sft_module.sft_loss, {"n": 0}

    def crash_in_third_epoch(model, batch):
        calls["n"] += 1
        if calls["n"] > 4 + 2 * 2:  # the loss before (2 batches), 2 epochs of 2 batches, then a crash
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(sft_module, "sft_loss", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_sft(build_tiny_causal(), word_tokenizer(), examples, config, output_dir=tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    monkeypatch.setattr(sft_module, "sft_loss", real_loss)
    _, resumed = train_sft(build_tiny_causal(), word_tokenizer(), examples, config, output_dir=tmp_path / "cut",
                           progress=False)
    assert resumed["loss_after"] == pytest.approx(whole["loss_after"], rel=1e-5)
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in whole["history"]])
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    _, again = train_sft(build_tiny_causal(), word_tokenizer(), examples, config, output_dir=tmp_path / "cut",
                         progress=False)
    assert again == resumed  # finished: loaded, not retrained


CHAT_TEMPLATE = ("{% for m in messages %}<bos> {{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def test_a_chat_model_critiques_and_revises_in_a_real_multi_turn_conversation(monkeypatch):
    """Critique and revision requests are user turns after the answer's assistant turn: no transcript
    pasted into one user turn, no dangling "Critique:" cue."""
    import rlhfkit.cai.critique as critique

    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    seen = []

    def sample_batch(model, tokenizer, texts, n, sampling, use_chat_template):
        seen.extend(texts)
        return Samples([[f"answer {len(seen)}"] for _ in texts], [[False] for _ in texts], 1)

    monkeypatch.setattr(critique, "sample_batch", sample_batch)
    rules = RULES.model_copy(update={"principles": RULES.principles[:1]})
    [record] = revise(build_tiny_causal(), tokenizer, PROMPTS[:1], rules, rounds=1, use_chat_template=True,
                      progress=False)
    assert seen == [
        "<bos> user how do i fix bike assistant",
        "<bos> user how do i fix bike <bos> assistant answer 1 <bos> user is it bad assistant",
        "<bos> user how do i fix bike <bos> assistant answer 1 <bos> user is it bad <bos> assistant answer 2 "
        "<bos> user make it nice assistant"]
    assert record.final == "answer 3"
    shown = revision_dry_run(rules, "how do i fix bike", tokenizer, use_chat_template=True)
    assert list(shown.values())[2] == ("<bos> user how do i fix bike <bos> assistant <initial response> <bos> user "
                                       "is it bad <bos> assistant <critique> <bos> user make it nice assistant")


@pytest.mark.parametrize(("revision", "cut", "final", "final_truncated"), [
    ("help more words", True, "help more words", True),  # cut at the limit: the start of an answer
    ("help more\n\nHuman: again", True, "help more", False),  # a stop string ended it before the limit
    ("help more", False, "help more", False),  # EOS sampled
    ("", True, "nice answer", True),  # an empty revision keeps the initial answer, cut as it was
])
def test_a_final_revision_cut_at_max_new_tokens_is_marked_and_trained_without_eos(monkeypatch, revision, cut, final,
                                                                                   final_truncated):
    import rlhfkit.cai.critique as critique
    from rlhfkit.cai.sft import SFTExample, sft_batch

    outputs = iter([("nice answer", True), ("is bad", False), (revision, cut)])  # initial, critique, revision

    def sample_batch(model, tokenizer, texts, n, sampling, use_chat_template):
        text, truncated = next(outputs)
        return Samples([[text]], [[truncated]], 1)

    monkeypatch.setattr(critique, "sample_batch", sample_batch)
    rules = RULES.model_copy(update={"principles": RULES.principles[:1]})
    [record] = revise(build_tiny_causal(), word_tokenizer(), PROMPTS[:1], rules, rounds=1, progress=False)
    assert (record.final, record.final_truncated) == (final, final_truncated)
    tokenizer = word_tokenizer()
    batch = sft_batch(tokenizer, [SFTExample(record.prompt, record.final, record.final_truncated)], False, SFTConfig())
    ends_with_eos = batch.completion_ids[0, -1].item() == tokenizer.eos_token_id
    assert ends_with_eos != final_truncated


def test_few_shot_examples_are_earlier_exchanges_of_the_same_conversation():
    from rlhfkit.cai.critique import critique_request

    rules = RULES.model_copy(update={"examples": [Example(prompt="p", response="r", critique="c", revision="v")]})
    turns = critique_request(rules, "how do i fix bike", "go away", rules.principles[0], chat=True)
    assert [(t.role, t.content) for t in turns] == [
        ("user", "p"), ("assistant", "r"), ("user", "is it bad"), ("assistant", "c"), ("user", "make it nice"),
        ("assistant", "v"), ("user", "how do i fix bike"), ("assistant", "go away"), ("user", "is it bad")]
