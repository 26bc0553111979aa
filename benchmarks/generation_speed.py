"""Rollout generation: tokens/s of `transformers` `generate` vs rlhfkit's engine, same shapes and sampling.

Both sides sample from softmax(logits / τ) with every completion exactly ``max_new_tokens`` long (EOS
forbidden before, as the shared workload's ``min_new_tokens``), n samples per prompt:
  (a) the shared workload's 5.3M GPT-2 policy at GRPO's shapes (8 prompts × 4 samples, 16 + 32 tokens);
  (b) SmolLM2-135M-Instruct (fp32; the demo's cached dequantised copy, else skipped) at 2 prompts × 4 samples
      with the chat template, 32 new tokens.
The two sides run interleaved (A, B, A, B, ...) so that load from other processes hits both alike; the
ratio reported is the median of the per-pair ratios. Writes benchmarks/results/generation_speed-<time>.json.

    python benchmarks/generation_speed.py [--rounds 8] [--bench-dir ../shared/bench] [--skip-smollm2] [--threads 2]

On a machine shared with other work, --threads 1 keeps the two sides from thrashing each other's threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

TARGET = 2.0


def interleaved(sides: dict, rounds: int) -> dict:
    """Run each side once per round, in turn; tokens/s per side (median) and the median per-round ratio."""
    seconds = {name: [] for name in sides}
    tokens = {}
    for name, run in sides.items():  # warm-up, not timed
        tokens[name] = int(run().numel())
    for _ in range(rounds):
        for name, run in sides.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    (a, a_s), (b, b_s) = seconds.items()
    return {"tokens_per_call": tokens,
            "tokens_per_s": {name: round(tokens[name] / statistics.median(s), 1) for name, s in seconds.items()},
            "seconds_per_call": {name: [round(x, 4) for x in s] for name, s in seconds.items()},
            "ratio": round(statistics.median(x / y for x, y in zip(a_s, b_s, strict=True)), 3),
            "ratio_is": f"{b} tokens/s ÷ {a} tokens/s"}


def compare(model, tokenizer, encoded, n: int, max_new_tokens: int, rounds: int) -> dict:
    import torch

    from rlhfkit.models.engine import Decoding, generate_sampling, kv_cached_sampling

    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    decoding = Decoding(max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=1.0,
                        min_new_tokens=max_new_tokens)
    sides = {"generate": lambda: generate_sampling(model, prompt_ids, prompt_mask, n, decoding),
             "engine": lambda: kv_cached_sampling(model, prompt_ids, prompt_mask, n, decoding)}
    with torch.inference_mode():
        result = interleaved(sides, rounds)
    return {"shape": {"prompts": prompt_ids.shape[0], "samples_per_prompt": n, "prompt_tokens": prompt_ids.shape[1],
                      "new_tokens": max_new_tokens, "temperature": 1.0}, **result}


def workload_policy(W, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = W.prepare_artifacts()
    model = AutoModelForCausalLM.from_pretrained(paths["policy"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    encoded = tokenizer(W.prompts()[:W.GRPO.prompts_per_step], return_tensors="pt", padding=True)
    return {"model": "shared workload GPT-2 (5.3M)",
            **compare(model, tokenizer, encoded, W.GRPO.generations_per_prompt, W.COMPLETION_LEN, rounds)}


def smollm2(rounds: int) -> dict | None:
    from rlhfkit.demo.presets import cache_dir, load_smollm2
    from rlhfkit.generate import format_prompt

    if not (cache_dir() / "smollm2-135m-instruct" / "config.json").exists():
        print("SmolLM2-135M-Instruct: no dequantised copy in the cache (run the smollm2 demo once); skipped")
        return None
    model, tokenizer = load_smollm2()
    texts = [format_prompt(p, tokenizer, True) for p in ("How do I fix a flat bike tyre?", "Write a short poem.")]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"model": "SmolLM2-135M-Instruct (fp32)",
            **compare(model, tokenizer, encoded, 4, 32, rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--smollm2-rounds", type=int, default=3)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the workload's)")
    parser.add_argument("--bench-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    args = parser.parse_args()
    sys.path.insert(0, args.bench_dir)
    import bench_common as B
    import torch
    import transformers
    import workload as W

    B.setup_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [workload_policy(W, args.rounds)]
    if not args.skip_smollm2:
        runs.append(smollm2(args.smollm2_rounds))
    runs = [r for r in runs if r is not None]
    print(f"{'model':34} {'generate tok/s':>15} {'engine tok/s':>13} {'ratio':>6} {'target':>7}")
    for r in runs:
        print(f"{r['model']:34} {r['tokens_per_s']['generate']:>15} {r['tokens_per_s']['engine']:>13} "
              f"{r['ratio']:>6} {'≥ ' + str(TARGET):>7}")
    result = {"runs": runs, "target_ratio": TARGET, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__, **B.contention()}
    out = Path(__file__).parent / "results" / f"generation_speed-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"other processes' CPU during the run: {result['other_cpu_s']} s -> {out}")


if __name__ == "__main__":
    main()
