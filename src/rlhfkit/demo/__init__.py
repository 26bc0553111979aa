"""The main job (`rlhfkit demo`): the whole RLHF loop, offline, on built-in defaults, once per
training seed.

    prompts → N completions per prompt (+ answers borrowed from other topics) → simulated labelers rank
    them in the feedback app, through its API (one labeler is poor) → agreement (the poor labeler is
    spotted and left out) → Borda consensus → pairs → Bradley-Terry reward model on prompt + answer →
    PPO (smollm2: GRPO) with a KL term to the reference, monitors that can stop it → evaluation on held-out prompts
    (gold = the labelers' hidden criterion, relevance, diversity, KL; the proxy apart) → per-seed and
    pooled results → report.html

The labelers' hidden criterion is never the reward the policy is trained on: the RL stage optimises the reward
model learned from their rankings (the proxy); the evaluation reports the criterion itself (gold) and
judges that are neither. The same stages run on your own model, prompts and people with the stage
commands: `rlhfkit generate`, the feedback app or your rankings, `rlhfkit pairs`, `rlhfkit reward
train`, `rlhfkit ppo`, `rlhfkit evaluate`.
"""

from rlhfkit.demo.presets import DemoConfig
from rlhfkit.demo.run import run_demo

__all__ = ["DemoConfig", "run_demo"]
