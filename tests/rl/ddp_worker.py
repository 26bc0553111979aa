"""Run by test_ddp.py under torchrun: 2 CPU processes (gloo) train PPO with an adaptive β for a few steps,
then the same run interrupted and resumed; each writes the prompts it saw, hashes of its weights and β."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from conftest import build_tiny_causal, word_tokenizer
from rlhfkit.reward.base import FunctionReward
from rlhfkit.rl.monitors import RewardHackingMonitor
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

    def make(steps: int, output: str) -> PPOTrainer:
        config = PPOConfig(steps=steps, batch_size=4, minibatch_size=2, ppo_epochs=1, lr=1e-3, max_new_tokens=5,
                           kl_target=0.05, kl_horizon=20, output_dir=str(out / output))
        return PPOTrainer(config, build_tiny_causal(), word_tokenizer(), reward, prompts,
                          monitor=RewardHackingMonitor(reward, relevance=reward))

    trainer = make(3, "run")
    initial = weights_hash(trainer)
    seen = [trainer.prompts_for_step(step) for step in range(3)]
    trainer.train()
    # the same run interrupted after 2 steps and resumed from its checkpoint
    first = make(2, "first")
    first.train()
    first.save_checkpoint(out / "checkpoint")
    resumed = make(3, "resumed")
    resumed.load_checkpoint(out / "checkpoint")
    resumed.train()
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": trainer.accelerator.num_processes, "backend": str(torch.distributed.get_backend()),
        "prompts": seen, "initial": initial, "weights": weights_hash(trainer), "history": trainer.history,
        "beta": trainer.kl_controller.value, "resumed_weights": weights_hash(resumed),
        "resumed_beta": resumed.kl_controller.value}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
