"""Run by test_ddp.py under torchrun: 2 CPU processes (gloo) train GRPO with one prompt a process and step (a group
of 2 answers); each writes its history, whose relevance spread must be the one of both processes' prompts."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import build_tiny_causal, word_tokenizer
from rlhfkit.reward.base import FunctionReward
from rlhfkit.rl.grpo import GRPOConfig, GRPOTrainer
from rlhfkit.rl.monitors import RewardHackingMonitor

RELEVANCE = {"bike": 0.9, "code": 0.7, "day": 0.3, "cake": 0.1}


def main(out: Path) -> None:
    reward = FunctionReward(lambda p, c: float("happy" in c.split()))
    prompts = ["how do i fix bike", "how do i write code", "how do i plan day", "how do i bake cake"]
    relevance = FunctionReward(lambda p, c: RELEVANCE[p.split()[-1]])  # one value a prompt
    config = GRPOConfig(steps=2, batch_size=1, group_size=2, lr=1e-3, max_new_tokens=4, output_dir=str(out / "run"))
    trainer = GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), reward, prompts,
                          monitor=RewardHackingMonitor(reward, relevance=relevance))
    seen = [trainer.prompts_for_step(step) for step in range(2)]
    trainer.train()
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({"prompts": seen, "history": trainer.history}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
