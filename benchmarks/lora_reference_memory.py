"""Peak memory of PPO with a separate reference copy versus the shared LoRA reference.

Each variant runs in its own process (peak RSS is per process): a few PPO steps on
SmolLM2-135M-Instruct (the demo's cached copy; run `make demo` once first), CPU, float32.

    python benchmarks/lora_reference_memory.py [--steps 2] [--json out.json]

variants: full   — full fine-tuning, reference = frozen copy of the policy
          lora-copy — LoRA, reference = a frozen copy of the model (what you get without sharing)
          lora-shared — LoRA, reference = the same base weights with the adapter disabled
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_variant(variant: str, steps: int) -> dict:
    import torch

    from rlhfkit.console import console
    from rlhfkit.demo.presets import load_smollm2
    from rlhfkit.models.reference import Reference, add_lora
    from rlhfkit.reward.base import FunctionReward
    from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

    console.quiet = True
    torch.set_num_threads(2)
    policy, tokenizer = load_smollm2()
    if variant != "full":
        policy = add_lora(policy, r=8, alpha=16)
    reference = Reference(policy, copy_weights=variant != "lora-shared")
    config = PPOConfig(steps=steps, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=16, lr=1e-5,
                       use_chat_template=True, output_dir="/tmp/rlhfkit-memory-bench")
    reward = FunctionReward(lambda p, c: len(c) / 100)
    prompts = ["Describe Mondays in one sentence.", "Write a note to a noisy neighbour."] * 4
    started = time.perf_counter()
    trainer = PPOTrainer(config, policy, tokenizer, reward, prompts, reference=reference)
    for _ in range(steps):
        trainer.train_step()
    return {"variant": variant, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "reference_holds_own_weights": not reference.shared, "seconds": time.perf_counter() - started,
            "trainable_params": sum(p.numel() for p in trainer.actor.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", default="lora_reference_memory.json")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps)))
        return
    results = []
    for variant in ("full", "lora-copy", "lora-shared"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{variant:12s} peak RSS {r['peak_rss_mib']:7.0f} MiB  trainable {r['trainable_params']:>11,}  "
              f"{r['seconds']:.0f}s", flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
