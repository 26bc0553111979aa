"""GRPO and RLOO: G completions per prompt, a baseline from the group instead of a value model.

Both use PPO's rollout and log-prob code; they differ in the baseline and where the KL goes.

GRPO (Shao et al. 2024), ``advantage="grpo"``, ``kl_penalty="loss"``:

    A_i = (R_i − mean_j R_j) / std_j R_j                       over the G completions of one prompt
    L = −1/G Σ_i 1/|y_i| Σ_t [ min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i) − β · ρ_t · KL_k3,t ]

The KL term is weighted by ρ_t (``kl_importance_weight``, as TRL's ``use_bias_correction_kl``): with
y_t drawn from π_θ_old, E[ρ_t k3_t] = KL(π_θ ‖ π_ref) and its gradient is ∇KL(π_θ ‖ π_ref) =
E[log(π_θ/π_ref) ∇log π_θ], the KL that is reported and meant. The paper's unweighted k3 has the
same value at ρ = 1 but the gradient E[(1 − π_ref/π_θ) ∇log π_θ] = ∇KL(π_ref ‖ π_θ), the KL the
other way round (``kl_importance_weight=False`` keeps it).

RLOO (Ahmadian et al. 2024), ``advantage="rloo"``, ``kl_penalty="reward"``:

    R'_i = R_i − β · Σ_t KL_k1,t                               KL folded into the reward
    A_i = R'_i − 1/(G−1) Σ_{j≠i} R'_j                          leave-one-out baseline
    L = −1/G Σ_i 1/|y_i| Σ_t min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i)

with ρ_t = π_θ(y_t) / π_θ_old(y_t) (1 on the first of ``epochs`` passes, where the gradient is the
plain policy gradient).

``action="completion"`` treats the whole completion as one action, as the RLOO paper and TRL's
``RLOOTrainer`` do (KL in the reward only):

    ρ_i = exp Σ_t (log π_θ(y_t) − log π_θ_old(y_t))            one ratio per completion
    L = −1/G Σ_i min(ρ_i A_i, clip(ρ_i, 1−ε, 1+ε) A_i)

At ρ = 1 its gradient is −1/G Σ_i A_i Σ_t ∇log π_θ(y_t), the REINFORCE estimator of ∇E[R]; the
default ``"token"`` gives each completion −A_i/|y_i| Σ_t ∇log π_θ(y_t): the same direction at equal
lengths, |y_i| times smaller (so gradient clipping and Adam see other magnitudes), and shorter
completions weighted more when lengths differ. Over several ``epochs`` the completion's ratio leaves
[1−ε, 1+ε] sooner than any one token's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.config import require
from rlhfkit.rl.advantages import group_normalized, leave_one_out, masked_mean
from rlhfkit.rl.kl import KLEstimator, kl_estimator
from rlhfkit.rl.trainer import OnPolicyTrainer, RLConfig
from rlhfkit.rollout import Rollout


@dataclass
class GRPOConfig(RLConfig):
    group_size: int = 4  # G completions per prompt (batch_size prompts → batch_size × G completions)
    epochs: int = 1  # passes over each rollout
    minibatch_size: int = 0  # completions per gradient step (0: the whole rollout at once)
    clip_eps: float = 0.2
    advantage: Literal["grpo", "rloo"] = "grpo"
    kl_penalty: Literal["loss", "reward"] = "loss"
    kl_coef: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_importance_weight: bool = True  # GRPO's KL term times ρ_t: the gradient of KL(π_θ ‖ π_ref) (module docstring)
    scale_rewards: bool = True  # GRPO: divide by the group's std
    # the unit of the ratio and the surrogate: each token (per-sequence mean of per-token terms) or the whole
    # completion (TRL's RLOOTrainer; KL in the reward only). See the module docstring.
    action: Literal["token", "completion"] = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        # one completion is its own group baseline: its advantage is 0 (and a std of one value undefined)
        require(self.group_size >= 2, "group_size", "must be at least 2 (a group baseline needs several completions "
                                                    "of a prompt)")
        require(self.epochs >= 1, "epochs", "must be at least 1")
        rollout = self.batch_size * self.group_size
        require(self.minibatch_size >= 0, "minibatch_size", "must be at least 0 (0: the whole rollout)")
        require(self.minibatch_size == 0 or rollout % self.minibatch_size == 0, "minibatch_size",
                f"{self.minibatch_size} does not divide the rollout's batch_size × group_size = {rollout} completions")
        require(self.clip_eps > 0, "clip_eps", "must be positive")
        require(self.action == "token" or self.kl_penalty == "reward", "action",
                "'completion' needs the KL in the reward (kl_penalty: reward): the loss's KL term is per token")


RLOO_DEFAULTS = {"advantage": "rloo", "kl_penalty": "reward", "kl_estimator": "k1", "kl_coef": 0.05}


def rloo_config(**overrides) -> GRPOConfig:
    """RLOO's defaults: leave-one-out baseline, sequence-level k1 KL folded into the reward."""
    return GRPOConfig(**(RLOO_DEFAULTS | overrides))


def kl_loss_term(kl: KLEstimator, logprobs: torch.Tensor, ratio: torch.Tensor, ref_logprobs: torch.Tensor,
                 importance_weight: bool) -> torch.Tensor:
    """Per-token KL penalty of GRPO's loss: ρ_t · k(π_θ, π_ref) with ``importance_weight``, else k(π_θ, π_ref);
    ρ_t = π_θ(y_t) / π_θ_old(y_t) carries the gradient (its value is 1 on a rollout's first pass)."""
    per_token = kl(logprobs, ref_logprobs)
    return per_token * ratio if importance_weight else per_token


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_eps: float, action: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(ρ A, clip(ρ, 1−ε, 1+ε) A), ρ) per token [B, T] for ``action="token"``, per completion [B] with
    ρ_i = exp Σ_t (log π_θ − log π_θ_old) for ``"completion"``; ``advantages`` [B], one per completion."""
    log_ratio = logprobs - old_logprobs
    if action == "completion":
        ratio, advantages = torch.exp((log_ratio * mask).sum(dim=1)), advantages
    else:
        ratio, advantages = torch.exp(log_ratio), advantages.unsqueeze(1)
    return torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages), ratio


class GRPOTrainer(OnPolicyTrainer):
    """GRPO, or RLOO with ``rloo_config()`` (the ``algorithm`` name follows the config)."""

    def __init__(self, config: GRPOConfig, *args, **kwargs) -> None:
        self.algorithm = config.advantage
        super().__init__(config, *args, **kwargs)
        self.kl = kl_estimator(config.kl_estimator)

    @property
    def samples_per_prompt(self) -> int:
        return self.config.group_size

    @property
    def one_minibatch(self) -> bool:
        cfg = self.config
        return cfg.minibatch_size == 0 or cfg.minibatch_size >= cfg.batch_size * cfg.group_size

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg, mask, beta = self.config, rollout.mask, self.config.kl_coef
        reused = self.policy_pass(rollout)
        kl_old = self.kl(rollout.logprobs, rollout.ref_logprobs) * mask
        rewards = rollout.scores
        if cfg.kl_penalty == "reward":
            rewards = rewards - beta * kl_old.sum(dim=1)
        if cfg.advantage == "grpo":
            advantages = group_normalized(rewards, cfg.group_size, cfg.scale_rewards)
        else:
            advantages = leave_one_out(rewards, cfg.group_size)
        stats: dict[str, list[torch.Tensor]] = {}
        size = cfg.minibatch_size or len(rollout.batch)
        for epoch in range(cfg.epochs):
            for mb in self.minibatches(len(rollout.batch), size, mask.device):
                first = reused if epoch == 0 else None  # π_θ_old's pass, when one minibatch holds the rollout
                logprobs, entropy, _ = first or self.actor(rollout.batch[mb], self.sampling)
                surrogate, ratio = clipped_surrogate(logprobs, rollout.logprobs[mb], advantages[mb], mask[mb],
                                                     cfg.clip_eps, cfg.action)
                clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
                if cfg.action == "completion":
                    loss, clipfrac = -surrogate.mean(), clipped.mean()
                else:
                    if cfg.kl_penalty == "loss":
                        surrogate = surrogate - beta * kl_loss_term(self.kl, logprobs, ratio, rollout.ref_logprobs[mb],
                                                                    cfg.kl_importance_weight)
                    loss = -masked_mean(surrogate, mask[mb], dim=1).mean()  # per-sequence mean, then mean
                    clipfrac = masked_mean(clipped, mask[mb])
                grad_norm = self.optimizer_step(loss)
                with torch.no_grad():
                    for key, value in {"loss/policy": loss, "policy/entropy": masked_mean(entropy, mask[mb]),
                                       "policy/clipfrac": clipfrac,
                                       "policy/grad_norm": torch.tensor(grad_norm)}.items():
                        stats.setdefault(key, []).append(value)
        return {
            **{key: torch.stack(values).mean().item() for key, values in stats.items()},
            "reward/score": rollout.scores.mean().item(),
            "reward/total": (rollout.scores - beta * kl_old.sum(dim=1)).mean().item(),
            "kl/kl": kl_old.sum(dim=1).mean().item(),
            "response/length": mask.sum(dim=1).mean().item(),
        }
