"""Which prompts (GRPO, RLOO) or preference pairs (DPO) each side trains on at each step, per seed.

TRL's side: its runner (``../shared/bench/run_<algo>.py`` through ``trl_seeded.py SEED``, TRL's Python) up
to ``trainer.train()``, which is replaced by reading the batches of ``trainer.get_train_dataloader()``
(its ``RepeatSampler`` for GRPO/RLOO, the ``Trainer``'s seeded random sampler for DPO). rlhfkit's side:
``GRPOTrainer.prompts_for_step`` for the workload's steps; for DPO the pairs ``DPOTrainer.train`` batches
at each step (recorded with the gradient step switched off: the order does not depend on the weights).
Each item is named by its index in the workload's ``prompts()`` / ``preference_pairs()``. Prints per
workload and seed how many steps see the same items in the same order on both sides, and how many items
each side sees in all and in common; writes it all to ``--out``.

    PYTHONPATH=src python benchmarks/data_order_vs_trl.py --algos grpo,dpo --seeds 1234,1235
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

# run with TRL's Python: argv[1] bench dir, argv[2] output JSON, argv[3] steps, argv[4:] trl_seeded.py's argv.
# Each step's batch as the prompt token ids of its items (GRPO/RLOO: the prompt text of each of the G copies).
RECORD_TRL_ORDER = """
import json, runpy, sys, trl
sys.path.insert(0, sys.argv[1])
import workload
workload.NUM_THREADS = 1
out, steps = sys.argv[2], int(sys.argv[3])
def record(self, *args, **kwargs):
    batches = []
    for batch in self.get_train_dataloader():
        if isinstance(batch, list):  # GRPO/RLOO: one dict per completion
            batches.append([[workload.WORD_TO_ID[w] for w in item["prompt"].split()] for item in batch])
        else:  # DPO: chosen rows then rejected rows, each prompt + completion
            half = len(batch["input_ids"]) // 2
            batches.append(batch["input_ids"][:half, :workload.PROMPT_LEN].tolist())
        if len(batches) == steps:
            break
    json.dump(batches, open(out, "w"))
    raise SystemExit(0)
trl.GRPOTrainer.train = trl.RLOOTrainer.train = trl.DPOTrainer.train = record
sys.argv = sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def trl_order(algo: str, seed: int, steps: int, bench_dir: Path, trl_venv: Path) -> list[list[tuple[int, ...]]]:
    """TRL's items of each step, each as its prompt's token ids (a GRPO prompt once, not G times)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "order.json"
        env = os.environ | {"RLHF_BENCH_RESULTS": folder, "HF_HUB_OFFLINE": "1"}
        subprocess.run([str(trl_venv / "bin" / "python"), "-c", RECORD_TRL_ORDER, str(bench_dir), str(out),
                        str(steps), str(HERE / "trl_seeded.py"), str(seed), str(bench_dir / f"run_{algo}.py")],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        batches = [[tuple(ids) for ids in batch] for batch in json.loads(out.read_text())]
    if algo == "dpo":
        return batches
    import workload as W

    group = (W.GRPO if algo == "grpo" else W.RLOO).generations_per_prompt
    return [batch[::group] for batch in batches]


def rlhfkit_order(algo: str, seed: int, steps: int) -> list[list[str]]:
    """rlhfkit's items of each step, as their prompt texts."""
    import workload as W
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.console import console

    console.quiet = True
    out = tempfile.mkdtemp(prefix="rlhfkit-order-")
    paths = W.prepare_artifacts()
    policy, tokenizer = AutoModelForCausalLM.from_pretrained(paths["policy"]), AutoTokenizer.from_pretrained(
        paths["tokenizer"])
    if algo == "dpo":
        import rlhfkit.rl.dpo as dpo
        from rlhfkit.data.records import PreferencePair

        pairs = [PreferencePair(**p) for p in W.preference_pairs()]
        trainer = dpo.DPOTrainer(dpo.DPOConfig(batch_size=W.DPO.pairs_per_step, max_steps=steps, eval_fraction=0.0,
                                               seed=seed, output_dir=out, precision="fp32"), policy, tokenizer)
        batched, batch = [], trainer.batch
        trainer.batch = lambda step_pairs: batched.append([p.prompt for p in step_pairs]) or batch(step_pairs)
        apply_gradients, dpo.apply_gradients = dpo.apply_gradients, lambda *args: 0.0  # the order only
        try:
            trainer.train(pairs, eval_pairs=[], progress=False)
        finally:
            dpo.apply_gradients = apply_gradients
        return batched[-steps:]  # after the reference's pass over every pair
    from rlhfkit.rl.grpo import GRPOConfig, GRPOTrainer, rloo_config

    wl = W.GRPO if algo == "grpo" else W.RLOO
    fields = dict(steps=steps, batch_size=wl.prompts_per_step, group_size=wl.generations_per_prompt, seed=seed,
                  max_new_tokens=wl.completion_len, output_dir=out)
    config = GRPOConfig(**fields) if algo == "grpo" else rloo_config(**fields)
    trainer = GRPOTrainer(config, policy, tokenizer, lambda prompts, completions: [0.0] * len(completions),
                          W.prompts())
    return [trainer.prompts_for_step(step) for step in range(steps)]


def compare_orders(trl: list[list[int]], rlhfkit: list[list[int]]) -> dict:
    """Steps whose items (indices) are the same and in the same order on both sides (in all, and before the
    first that differs), the items each side sees, and the items both see."""
    same = [a == b for a, b in zip(trl, rlhfkit, strict=True)]
    seen_trl, seen_rlhfkit = {i for b in trl for i in b}, {i for b in rlhfkit for i in b}
    return {"steps": len(same), "same_steps": sum(same),
            "same_until": same.index(False) if False in same else len(same), "items_trl": len(seen_trl),
            "items_rlhfkit": len(seen_rlhfkit), "items_both": len(seen_trl & seen_rlhfkit)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", default="grpo,rloo,dpo")
    parser.add_argument("--seeds", default="1234,1235,1236,1237,1238,1239")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--bench-dir", type=Path, default=HERE.parents[1] / "shared" / "bench")
    parser.add_argument("--trl-venv", type=Path, default=Path.home() / ".cache" / "rlhf-bench" / "venv-trl")
    parser.add_argument("--out", type=Path, default=None, help="JSON of every step's items on both sides")
    args = parser.parse_args()
    sys.path.insert(0, str(args.bench_dir))
    import torch
    import workload as W

    torch.set_num_threads(1)
    report = []
    for algo in args.algos.split(","):
        texts = W.prompts() if algo != "dpo" else [p["prompt"] for p in W.preference_pairs()]
        by_text = {text: i for i, text in enumerate(texts)}
        by_ids = {tuple(W.WORD_TO_ID[word] for word in text.split()): i for i, text in enumerate(texts)}
        for seed in map(int, args.seeds.split(",")):
            trl = [[by_ids[ids] for ids in batch] for batch in trl_order(algo, seed, args.steps, args.bench_dir,
                                                                         args.trl_venv)]
            rlhfkit = [[by_text[text] for text in batch] for batch in rlhfkit_order(algo, seed, args.steps)]
            result = compare_orders(trl, rlhfkit)
            report.append({"algo": algo, "seed": seed, **result, "trl": trl, "rlhfkit": rlhfkit})
            print(f"{algo} seed {seed}: the same items in the same order at {result['same_steps']} of "
                  f"{result['steps']} steps (all of the first {result['same_until']}); items seen: TRL "
                  f"{result['items_trl']}, rlhfkit {result['items_rlhfkit']}, both {result['items_both']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
