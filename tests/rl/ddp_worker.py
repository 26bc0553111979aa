"""Run by test_ddp.py under torchrun: 2 CPU processes (gloo) train PPO for a few steps; each writes the
prompts it saw and a hash of its weights."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from conftest import build_tiny_causal, word_tokenizer
from rlhfkit.reward.base import FunctionReward
from rlhfkit.rl.ppo import PPOConfig, PPOTrainer


def weights_hash(trainer: PPOTrainer) -> str:
    digest = hashlib.sha256()
    for _, p in sorted(trainer.accelerator.unwrap_model(trainer.actor).state_dict().items()):
        digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(out: Path) -> None:
    reward = FunctionReward(lambda p, c: float("happy" in c.split()))
    prompts = [f"how do i {w}" for w in ("fix bike", "write code", "plan day", "bake cake", "help you", "email",
                                         "garden", "code")]
    config = PPOConfig(steps=3, batch_size=4, minibatch_size=2, ppo_epochs=1, lr=1e-3, max_new_tokens=5,
                       output_dir=str(out / "run"))
    trainer = PPOTrainer(config, build_tiny_causal(), word_tokenizer(), reward, prompts)
    initial = weights_hash(trainer)
    seen = [trainer.prompts_for_step(step) for step in range(config.steps)]
    trainer.train()
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": trainer.accelerator.num_processes, "backend": str(torch.distributed.get_backend()),
        "prompts": seen, "initial": initial, "weights": weights_hash(trainer), "history": trainer.history}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
