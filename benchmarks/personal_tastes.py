"""Experiment behind `rlhfkit demo --preset personal`: what the toy policy's answers vary on, and
whether on-policy rounds of per-user DPO (+ NLL) teach two users' opposite tastes, for given settings.

    python benchmarks/personal_tastes.py --look                       # the base samples' spread
    python benchmarks/personal_tastes.py --lr 1e-3 --beta 0.1 --nll 1 --epochs 4 --rounds 4

Each run writes its report.json and curves.png under --run-dir (a fresh folder per run).
Results: benchmarks/results/personal_tastes.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from rlhfkit.demo.personal import TASTES, PersonalDemoConfig, demo_task_prompts, run_personal_demo, words
from rlhfkit.demo.presets import DemoConfig, load_demo_policy
from rlhfkit.eval.judges import SentimentJudge
from rlhfkit.personal.models import PersonalModels
from rlhfkit.personal.train import PersonalDPOConfig


def look(samples: int = 4) -> None:
    """Spread of the base policy's answers in words, sentiment, '!' and '?' over the training prompts."""
    policy, tokenizer, _ = load_demo_policy(DemoConfig(), False)
    models = PersonalModels(policy, tokenizer, Path("/tmp/personal-tastes-look"))
    train, _, _ = demo_task_prompts(PersonalDemoConfig())
    prompts = train[:24]
    answers = [models.answer(p, None, 1.0, 40, seed=s).text.strip() for p in prompts for s in range(samples)]
    sentiment = SentimentJudge()([p for p in prompts for _ in range(samples)], answers).tolist()
    for name, values in {"words": [words(a) for a in answers], "sentiment": sentiment,
                         "exclamations": [a.count("!") for a in answers], "questions": [a.count("?") for a in answers]
                         }.items():
        q = statistics.quantiles(values, n=4)
        print(f"{name:>12}: mean {statistics.mean(values):.2f} sd {statistics.pstdev(values):.2f} "
              f"quartiles {[round(x, 2) for x in q]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--look", action="store_true")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/personal-tastes"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--nll", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=PersonalDemoConfig.rounds)
    parser.add_argument("--per-round", type=int, default=16)
    parser.add_argument("--train-every", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--eval-prompts", type=int, default=PersonalDemoConfig.eval_prompts)
    parser.add_argument("--eval-samples", type=int, default=PersonalDemoConfig.eval_samples)
    parser.add_argument("--tastes", nargs="+", choices=sorted(TASTES), default=["brief", "detailed"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.look:
        return look()
    dpo = PersonalDPOConfig(lr=args.lr, beta=args.beta, nll_coef=args.nll, epochs=args.epochs)
    run_personal_demo(PersonalDemoConfig(run_dir=args.run_dir, rounds=args.rounds, prompts_per_round=args.per_round,
                                         train_every=args.train_every, seed=args.seed, dpo=dpo,
                                         max_new_tokens=args.max_new_tokens, eval_prompts=args.eval_prompts,
                                         eval_samples=args.eval_samples,
                                         tastes=[TASTES[t] for t in args.tastes]), progress=False)


if __name__ == "__main__":
    main()
