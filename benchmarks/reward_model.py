"""Reward-model training on the shared benchmark workload (../shared/bench), done with rlhfkit.

Identical work to the TRL runner ``run_reward.py``: the same 5.3M-parameter GPT-2 scalar-head model
from the same initial weights, the same 512 synthetic pairs, 8 pairs per step, 50 steps, AdamW at a
constant 1e-4, gradient clipping at 1.0, sequences of prompt + completion + <eos> (49 tokens).
Writes ``rlhfkit_reward.json`` next to the TRL results (``$RLHF_BENCH_RESULTS``) with the same keys.

    python benchmarks/reward_model.py [--bench-dir ../shared/bench]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    parser.add_argument("--seed", type=int, default=None,
                        help="training seed: pair order (default: the workload's SEED); initial weights and data "
                             "stay the workload's")
    args = parser.parse_args()
    sys.path.insert(0, args.bench_dir)
    import bench_common as B
    import workload as W

    seed = W.SEED if args.seed is None else args.seed

    B.setup_process()
    t_start = time.perf_counter()
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    from rlhfkit.data.records import PreferencePair
    from rlhfkit.reward.model import RewardModel, RewardModelConfig, train_reward_model

    paths = W.prepare_artifacts()
    model = GPT2ForSequenceClassification.from_pretrained(paths["reward_init"])
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    reward_model = RewardModel(model, tokenizer, max_length=W.REWARD.seq_len)
    pairs = [PreferencePair(prompt=p["prompt"], chosen=p["chosen"] + " <eos>", rejected=p["rejected"] + " <eos>")
             for p in W.preference_pairs()]
    config = RewardModelConfig(batching="pairs", batch_size=W.REWARD.pairs_per_step, max_steps=W.REWARD.steps,
                               epochs=1 + W.REWARD.steps * W.REWARD.pairs_per_step // len(pairs), lr=W.REWARD.lr,
                               lr_schedule="constant", warmup_ratio=0.0, max_grad_norm=W.REWARD.max_grad_norm,
                               eval_fraction=0.0, normalize=False, seed=seed)
    timer = SimpleNamespace(step_times=[], logs=[], t_train_begin=time.perf_counter(), t_train_end=None)
    last = [timer.t_train_begin]

    def on_step(log: dict) -> None:
        now = time.perf_counter()
        timer.step_times.append(now - last[0])
        last[0] = now
        timer.logs.append(log)

    train_reward_model(pairs, config, eval_pairs=[], reward_model=reward_model, progress=False, on_step=on_step)
    timer.t_train_end = time.perf_counter()
    B.finish("rlhfkit_reward", timer, W.REWARD.warmup_steps_excluded,
             {"workload": W.workload_summary()["reward"], "seed": seed, "params": B.param_count(model)},
             ["loss", "accuracy", "margin"], t_start=t_start)


if __name__ == "__main__":
    main()
