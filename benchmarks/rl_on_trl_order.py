"""rlhfkit's GRPO or RLOO replayed on TRL's own run: the same prompts at each step, the same sampler seeds.

The two sides of ``compare_trl.py --only grpo,rloo`` draw their prompts and their samples from different
generators, so their per-step rewards differ by what each step sees. This runs TRL's runner
(``run_grpo.py`` / ``run_rloo.py``, TRL's Python, the workload's seed) with the global generator seeded
1000 + k before its k-th ``generate`` and records each step's prompt and completion ids; then rlhfkit's
trainer (fp32, sampling through ``generate``, the generator seeded the same before each step's sampling)
over TRL's prompts, from the same initial weights. While both policies stay equal they sample the same
completions, so the same rewards; they part where the updates differ (or float rounding flips a token).
Prints, per rlhfkit variant, the steps whose completions equal TRL's, the largest reward difference, and
both sides' mean reward over the first and last 5 steps; writes them with both series to ``--out``.

    PYTHONPATH=src python benchmarks/rl_on_trl_order.py rloo [--variant action=completion] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLER_SEED = 1000  # + step, before each step's sampling, on both sides

# run with TRL's Python, 1 torch thread: TRL's runner argv[1], generate seeded argv[3] + call, prompts,
# completions and gradient norms recorded to argv[2]
RECORD_TRL_RUN = """
import json, runpy, sys, torch, transformers, workload
workload.NUM_THREADS = 1
runner, out, seed, calls, grad_norms = sys.argv[1], sys.argv[2], int(sys.argv[3]), [], []
log = transformers.Trainer.log
def logged(self, logs, *args, **kwargs):
    if "grad_norm" in logs:
        grad_norms.append(float(logs["grad_norm"]))
    return log(self, logs, *args, **kwargs)
transformers.Trainer.log = logged
generate = transformers.GenerationMixin.generate
def seeded(self, *args, **kwargs):
    prompt = kwargs.get("input_ids", args[0] if args else None)
    torch.manual_seed(seed + len(calls))
    output = generate(self, *args, **kwargs)
    calls.append({"prompt_ids": prompt.tolist(), "completion_ids": output[:, prompt.shape[1]:].tolist()})
    return output
transformers.GenerationMixin.generate = seeded
sys.argv = [runner]
runpy.run_path(runner, run_name="__main__")
json.dump({"calls": calls, "grad_norms": grad_norms}, open(out, "w"))
"""


def trl_run(algo: str, bench_dir: Path, trl_venv: Path, folder: Path) -> tuple[dict, dict]:
    """({"calls": each step's prompt and completion ids, "grad_norms": each step's gradient norm}, TRL's
    result JSON) from one seeded run of TRL's runner."""
    calls = folder / "calls.json"
    env = os.environ | {"RLHF_BENCH_RESULTS": str(folder), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(bench_dir)}
    subprocess.run([str(trl_venv / "bin" / "python"), "-c", RECORD_TRL_RUN, str(bench_dir / f"run_{algo}.py"),
                    str(calls), str(SAMPLER_SEED)], env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(calls.read_text()), json.loads((folder / f"trl_{algo}.json").read_text())


def rlhfkit_run(algo: str, step_prompts: list[list[str]], variant: dict) -> tuple[list[dict], list[list[list[int]]]]:
    """(rlhfkit's stats of each step, its completion ids of each step) over ``step_prompts``, in fp32, with
    the config fields of ``variant`` changed."""
    import torch
    import workload as W
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rlhfkit.rollout
    from rlhfkit.console import console
    from rlhfkit.models import engine
    from rlhfkit.reward.base import FunctionReward
    from rlhfkit.rl.grpo import GRPOConfig, GRPOTrainer, rloo_config

    console.quiet = True
    paths = W.prepare_artifacts()
    completions: list[list[list[int]]] = []

    def seeded_sampling(*args, **kwargs) -> torch.Tensor:  # TRL samples through generate: so does the replay
        torch.manual_seed(SAMPLER_SEED + len(completions))
        ids = engine.generate_sampling(*args, **kwargs)
        completions.append(ids.tolist())
        return ids

    rlhfkit.rollout.sample_completions = seeded_sampling
    reward = FunctionReward(lambda prompts, texts: [W.target_fraction([W.WORD_TO_ID.get(w, W.UNK_ID)
                                                                       for w in t.split()]) for t in texts],
                            batched=True)
    wl = W.GRPO if algo == "grpo" else W.RLOO
    fields = dict(steps=wl.steps, batch_size=wl.prompts_per_step, group_size=wl.generations_per_prompt,
                  epochs=wl.num_iterations, clip_eps=wl.epsilon, kl_coef=wl.beta, lr=wl.lr,
                  max_grad_norm=wl.max_grad_norm, temperature=wl.temperature, max_new_tokens=wl.completion_len,
                  min_new_tokens=wl.completion_len, precision="fp32", output_dir=tempfile.mkdtemp()) | variant
    config = GRPOConfig(**fields) if algo == "grpo" else rloo_config(**fields)
    trainer = GRPOTrainer(config, AutoModelForCausalLM.from_pretrained(paths["policy"]),
                          AutoTokenizer.from_pretrained(paths["tokenizer"]), reward, W.prompts())
    trainer.prompts_for_step = lambda step: step_prompts[step]
    return [trainer.train_step() for _ in step_prompts], completions


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare(trl_rewards: list[float], trl_completions: list, rewards: list[float], completions: list) -> dict:
    """Steps with the same completions as TRL's (in all, and before the first that differs), the largest
    per-step reward difference, and both sides' first-5 and last-5 mean rewards."""
    same = [a == b for a, b in zip(trl_completions, completions, strict=True)]
    return {"same_completions_steps": sum(same),
            "same_completions_until": same.index(False) if False in same else len(same),
            "max_reward_difference": max(abs(a - b) for a, b in zip(trl_rewards, rewards, strict=True)),
            "trl_first5": mean(trl_rewards[:5]), "trl_last5": mean(trl_rewards[-5:]),
            "rlhfkit_first5": mean(rewards[:5]), "rlhfkit_last5": mean(rewards[-5:])}


def parse_variant(text: str) -> dict:
    """``field=value,field=value`` → {field: value} (ints, floats and true/false converted)."""
    variant = {}
    for item in filter(None, text.split(",")):
        field, value = item.split("=", 1)
        for convert in (int, float):
            try:
                variant[field] = convert(value)
                break
            except ValueError:
                continue
        else:
            variant[field] = {"true": True, "false": False}.get(value.lower(), value)
    return variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("algo", choices=["grpo", "rloo"])
    parser.add_argument("--variant", action="append", default=[],
                        help="rlhfkit config fields for one more replay, e.g. action=completion (repeatable; "
                             "the defaults always run first)")
    parser.add_argument("--bench-dir", type=Path, default=HERE.parents[1] / "shared" / "bench")
    parser.add_argument("--trl-venv", type=Path, default=Path.home() / ".cache" / "rlhf-bench" / "venv-trl")
    parser.add_argument("--out", type=Path, default=None, help="JSON of both series and the comparison")
    args = parser.parse_args()
    sys.path.insert(0, str(args.bench_dir))
    import bench_common as B
    import workload as W

    W.NUM_THREADS = 1  # learning numbers do not depend on it; the machine is shared
    B.setup_process()
    with tempfile.TemporaryDirectory() as folder:
        recorded, trl = trl_run(args.algo, args.bench_dir, args.trl_venv, Path(folder))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(W.prepare_artifacts()["tokenizer"])
    texts = {tuple(tokenizer(p)["input_ids"]): p for p in W.prompts()}
    group = (W.GRPO if args.algo == "grpo" else W.RLOO).generations_per_prompt
    step_prompts = [[texts[tuple(ids)] for ids in call["prompt_ids"][::group]] for call in recorded["calls"]]
    trl_rewards = trl["trends"]["reward"]["series"]
    trl_completions = [call["completion_ids"] for call in recorded["calls"]]
    report = {"algo": args.algo, "seed": W.SEED, "trl": {"reward": trl_rewards, "kl": trl["trends"]["kl"]["series"],
                                                         "grad_norm": recorded["grad_norms"]}, "rlhfkit": []}
    print(f"TRL {args.algo}, seed {W.SEED}, generate seeded {SAMPLER_SEED} + step: reward "
          f"{mean(trl_rewards[:5]):.4f} → {mean(trl_rewards[-5:]):.4f}")
    for variant in [{}, *map(parse_variant, args.variant)]:
        history, completions = rlhfkit_run(args.algo, step_prompts, variant)
        rewards = [h["reward/score"] for h in history]
        result = compare(trl_rewards, trl_completions, rewards, completions)
        report["rlhfkit"].append({"variant": variant, "reward": rewards, "kl_sum": [h["kl/kl"] for h in history],
                                  "grad_norm": [h["policy/grad_norm"] for h in history], **result})
        print(f"rlhfkit {variant or 'defaults'}: same completions as TRL at {result['same_completions_steps']} of "
              f"{len(rewards)} steps (all of the first {result['same_completions_until']}), reward at most "
              f"{result['max_reward_difference']:.4f} from TRL's; {result['rlhfkit_first5']:.4f} → "
              f"{result['rlhfkit_last5']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
