"""rlhfkit's reward-model training step fed TRL's own order of pairs: does it learn as TRL's RewardTrainer does?

The two sides of ``compare_trl.py --only reward`` draw the order of the pairs from different generators, so
their per-step accuracy differs by the pairs each step sees. This runs TRL's runner (``run_reward.py``, with
TRL's Python, the workload's seed) recording the pairs of every step, then rlhfkit's step (``_process_share``,
``apply_gradients``, the training kernels: what ``train_reward_model`` runs) over the same batches from the
same initial weights, in fp32 and in bf16 autocast (where the CPU has a bf16 unit), and prints both sides'
pair accuracy and loss (first 5 and last 5 steps) and the steps where the accuracy is the same. Identical
algorithms give identical series in fp32, up to float rounding.

    PYTHONPATH=src python benchmarks/reward_on_trl_order.py [--bench-dir ../shared/bench] [--trl-venv DIR]
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

# run with TRL's Python: TRL's runner, its training batches' prompt ids recorded to argv[2]
RECORD_TRL_ORDER = """
import json, runpy, sys
import trl
runner, out, batches = sys.argv[1], sys.argv[2], []
compute_loss = trl.RewardTrainer.compute_loss
def recording(self, model, inputs, *args, **kwargs):
    if model.training:  # chosen sequences first, then rejected; a prompt is the first 16 tokens
        batches.append(inputs["input_ids"][: len(inputs["input_ids"]) // 2, :16].tolist())
    return compute_loss(self, model, inputs, *args, **kwargs)
trl.RewardTrainer.compute_loss = recording
sys.argv = [runner]
runpy.run_path(runner, run_name="__main__")
json.dump(batches, open(out, "w"))
"""


def trl_run(bench_dir: Path, trl_venv: Path, folder: Path) -> tuple[list[list[list[int]]], dict]:
    """(prompt ids of each training step's pairs, TRL's result JSON) from one run of TRL's runner."""
    order = folder / "order.json"
    env = os.environ | {"RLHF_BENCH_RESULTS": str(folder), "HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": str(bench_dir)}
    subprocess.run([str(trl_venv / "bin" / "python"), "-c", RECORD_TRL_ORDER, str(bench_dir / "run_reward.py"),
                    str(order)], env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(order.read_text()), json.loads((folder / "trl_reward.json").read_text())


def rlhfkit_run(batches: list[list[int]], setting: str) -> tuple[str, list[float], list[float]]:
    """(precision, accuracy of each step, loss of each step) of rlhfkit's training step over ``batches``
    (pair indices), in ``setting`` ("fp32", or "auto": bf16 where there is a bf16 unit)."""
    import torch
    import workload as W
    from accelerate import Accelerator
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    from rlhfkit.data.records import PreferencePair
    from rlhfkit.models.kernels import training_kernels
    from rlhfkit.models.update import adamw, apply_gradients
    from rlhfkit.precision import resolve_precision
    from rlhfkit.reward.model import RewardModel, _process_share

    paths = W.prepare_artifacts()
    model = GPT2ForSequenceClassification.from_pretrained(paths["reward_init"]).train()
    reward_model = RewardModel(model, AutoTokenizer.from_pretrained(paths["tokenizer"]), W.REWARD.seq_len)
    pairs = [PreferencePair(prompt=p["prompt"], chosen=p["chosen"] + " <eos>", rejected=p["rejected"] + " <eos>")
             for p in W.preference_pairs()]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    precision = resolve_precision(setting, accelerator.device)
    prepared, optimizer = accelerator.prepare(model, adamw(model.parameters(), W.REWARD.lr, accelerator.device))
    accuracy, loss_series = [], []
    with training_kernels(model, precision, W.REWARD.seq_len):
        for batch in batches:
            with precision.autocast():
                loss, sums = _process_share(accelerator, reward_model, prepared, [[pairs[i]] for i in batch])
            apply_gradients(accelerator, prepared, optimizer, loss, W.REWARD.max_grad_norm)
            accuracy.append((sums[1] / sums[3]).item())
            loss_series.append(sums[0].item())
    return ("bf16" if precision.dtype is not None else "fp32"), accuracy, loss_series


def first_last(series: list[float], k: int = 5) -> str:
    return f"{sum(series[:k]) / k:.3f} → {sum(series[-k:]) / k:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-dir", type=Path, default=HERE.parents[1] / "shared" / "bench")
    parser.add_argument("--trl-venv", type=Path, default=Path.home() / ".cache" / "rlhf-bench" / "venv-trl")
    args = parser.parse_args()
    sys.path.insert(0, str(args.bench_dir))
    import bench_common as B
    import workload as W

    B.setup_process()
    with tempfile.TemporaryDirectory() as folder:
        prompt_ids, trl = trl_run(args.bench_dir, args.trl_venv, Path(folder))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(W.prepare_artifacts()["tokenizer"])
    index = {tuple(tokenizer(p["prompt"])["input_ids"]): i for i, p in enumerate(W.preference_pairs())}
    batches = [[index[tuple(ids)] for ids in step] for step in prompt_ids]
    trl_accuracy, trl_loss = trl["trends"]["accuracy"]["series"], trl["trends"]["loss"]["series"]
    print(f"TRL (fp32), seed {W.SEED}: accuracy {first_last(trl_accuracy)}, loss {first_last(trl_loss)}")
    for setting in ("fp32", "auto"):
        precision, accuracy, loss = rlhfkit_run(batches, setting)
        same = sum(a == b for a, b in zip(accuracy, trl_accuracy, strict=True))
        gap = max(abs(a - b) for a, b in zip(loss, trl_loss, strict=True))
        print(f"rlhfkit ({precision}), TRL's order: accuracy {first_last(accuracy)}, loss {first_last(loss)}; "
              f"accuracy as TRL's at {same} of {len(accuracy)} steps, loss at most {gap:.4f} from TRL's")


if __name__ == "__main__":
    main()
