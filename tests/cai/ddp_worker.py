"""Run by test_sft_ddp.py, under torchrun (2 CPU processes, gloo) or alone: CAI SFT of a tiny causal model
(dropout off, so that 2 processes and 1 process compute the same function), then, under torchrun, a run
in which only rank 1's loss is NaN at step 2. Each process writes what it saw and what it ended with."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import PartialState

import rlhfkit.cai.sft as sft_module
from conftest import build_tiny_causal, word_tokenizer
from rlhfkit.cai.sft import SFTConfig, train_sft
from rlhfkit.models.update import TrainingDiverged
from rlhfkit.reward.model import set_dropout

# 7 examples in batches of 3: the last batch holds 1 example, so under 2 processes rank 1 has none; responses
# of different lengths, so that each process's share of the batch's tokens differs
EXAMPLES = [("how do i fix bike", "you are doing great thanks for asking"), ("plan day", "happy to help"),
            ("bake cake", "great question glad you asked"), ("write code", "kind regards"),
            ("help you", "thanks for asking you are great"), ("garden", "glad to help"),
            ("email", "happy to help with your plan thanks")]
# fp32: the 2-process run must equal the 1-process one up to float rounding, which bf16 would swamp
CONFIG = SFTConfig(epochs=2, lr=3e-3, batch_size=3, use_chat_template=False, precision="fp32")


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def tiny_policy() -> torch.nn.Module:
    model = build_tiny_causal()
    set_dropout(model, 0.0)
    return model


def main(out: Path, mode: str) -> None:
    seen, saves, norms = [], [], []
    original_batch, original_save, original_update = sft_module.sft_batch, sft_module.save_as_loaded, \
        sft_module.apply_gradients

    def recording_batch(tokenizer, examples, *args, **kwargs):
        if torch.is_grad_enabled():  # a training step (the losses before and after are computed without)
            seen.append(sorted(response for _, response in examples))
        return original_batch(tokenizer, examples, *args, **kwargs)

    sft_module.sft_batch = recording_batch
    sft_module.save_as_loaded = lambda *args: saves.append(1) or original_save(*args)
    # the gradient norm of each step: the whole batch's gradient only if each process's loss is scaled right
    sft_module.apply_gradients = lambda *args: norms.append(original_update(*args)) or norms[-1]
    model = tiny_policy()
    initial = weights_hash(model)
    model, metrics = train_sft(model, word_tokenizer(), EXAMPLES, CONFIG, output_dir=out / "sft", progress=False)
    state = PartialState()  # as train_sft's Accelerator set it up (not before: it needs cpu=True for gloo)
    rank = state.process_index
    record = {"world": state.num_processes, "backend": str(state.backend), "seen": list(seen), "initial": initial,
              "weights": weights_hash(model), "metrics": metrics, "saves": len(saves), "norms": list(norms)}
    if mode == "ddp":
        original_loss, calls = sft_module.sft_loss, {"n": 0}

        def nan_on_rank_one_at_step_two(actor, batch):
            loss = original_loss(actor, batch)
            if torch.is_grad_enabled():
                calls["n"] += 1
                if rank == 1 and calls["n"] == 2:
                    return loss * float("nan")
            return loss

        sft_module.sft_loss = nan_on_rank_one_at_step_two
        try:
            train_sft(tiny_policy(), word_tokenizer(), EXAMPLES, CONFIG, output_dir=out / "nan", progress=False)
            record["nan_error"] = ""
        except TrainingDiverged as exc:
            record["nan_error"] = str(exc)
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():  # leave together: a rank exiting alone may abort gloo's threads
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
