"""Run by test_reward_ddp.py, under torchrun (2 CPU processes, gloo) or alone: trains a tiny reward model
(dropout off, so that 2 processes and 1 process compute the same function), then, under torchrun, a run
in which only rank 1 scores a NaN at step 2. Each process writes what it saw and what it ended with."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import rlhfkit.reward.model as reward_module
from conftest import TOPICS, build_tiny_reward_backbone, minilm_tokenizer, synthetic_pairs
from rlhfkit.models.update import TrainingDiverged
from rlhfkit.reward.model import RewardModel, RewardModelConfig, train_reward_model

# 7 training prompts in batches of 3: the last batch holds 1 prompt, so under 2 processes rank 1 has none
# fp32: the 2-process run must equal the 1-process one up to float rounding, which bf16 would swamp
CONFIG = RewardModelConfig(max_length=48, epochs=2, batch_size=3, lr=2e-3, eval_fraction=0.0, seed=0,
                           precision="fp32")


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def tiny_reward_model() -> RewardModel:
    backbone = build_tiny_reward_backbone(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return RewardModel(backbone, minilm_tokenizer(), max_length=48)


def spy_on_training_prompts(rm: RewardModel, seen: list) -> None:
    """Record the prompts of each training forward pass (the ones through the prepared model)."""
    original = rm.raw_rewards

    def recording(prompts, completions, model=None):
        if model is not None:
            seen.append(sorted(set(prompts)))
        return original(prompts, completions, model)

    rm.raw_rewards = recording


def nan_on_rank_one_at_step_two(rm: RewardModel, rank: int) -> None:
    original, calls = rm.raw_rewards, {"n": 0}

    def poisoned(prompts, completions, model=None):
        rewards = original(prompts, completions, model)
        if model is not None:
            calls["n"] += 1
            if rank == 1 and calls["n"] == 2:
                return rewards * float("nan")
        return rewards

    rm.raw_rewards = poisoned


def main(out: Path, mode: str) -> None:
    pairs, held_out = synthetic_pairs(TOPICS[:7]), synthetic_pairs(TOPICS[20:24], seed=1)
    saves, norms = [], []
    original_save, original_update = RewardModel.save, reward_module.apply_gradients
    RewardModel.save = lambda self, *args, **kwargs: saves.append(1) or original_save(self, *args, **kwargs)
    # the gradient norm of each step: the whole batch's gradient only if each process's loss is scaled right
    reward_module.apply_gradients = lambda *args: norms.append(original_update(*args)) or norms[-1]
    rm, seen, logged = tiny_reward_model(), [], []
    initial = weights_hash(rm.model)
    spy_on_training_prompts(rm, seen)
    rm = train_reward_model(pairs, CONFIG, output_dir=out / "rm", eval_pairs=held_out, reward_model=rm,
                            progress=False, on_step=logged.append)
    from accelerate import PartialState

    state = PartialState()
    record = {"world": state.num_processes, "backend": str(state.backend), "seen": seen, "initial": initial,
              "weights": weights_hash(rm.model), "logged": logged, "metrics": rm.metrics, "mean": rm.mean,
              "std": rm.std, "saves": len(saves), "norms": list(norms)}
    if mode == "ddp":
        poisoned = tiny_reward_model()
        nan_on_rank_one_at_step_two(poisoned, state.process_index)
        try:
            train_reward_model(pairs, CONFIG, output_dir=out / "nan", reward_model=poisoned, progress=False)
            record["nan_error"] = ""
        except TrainingDiverged as exc:
            record["nan_error"] = str(exc)
    (out / f"{mode}-rank{state.process_index}.json").write_text(json.dumps(record))
    if torch.distributed.is_initialized():  # leave together: a rank exiting alone may abort gloo's threads
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
