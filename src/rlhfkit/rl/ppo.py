"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

Phase 1 (rollout.py): sample y ~ π_θ_old(·|x), record log π_θ_old(y_t), log π_ref(y_t), V(s_t), and the
reward-model score R(x, y).

Phase 2, the update, reads top to bottom in :meth:`PPOTrainer.update`:

    per-token reward    r_t = −β · KL_t(π_θ_old ‖ π_ref)  + [t = last] · R(x, y)
    advantages          A_t, R_t = GAE(r, V; γ, λ), then A whitened over the batch
    ratio               ρ_t = exp(log π_θ(y_t) − log π_θ_old(y_t))
    policy loss         L_clip = −E_t[ min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t) ]
    value loss          L_V = ½ E_t[ max((V_θ − R_t)², (V_old + clip(V_θ − V_old, −ε_v, ε_v) − R_t)²) ]
    entropy bonus       S = E_t[ H(π_θ(·|s_t)) ]
    total               L = L_clip + c1 · L_V − c2 · S                (c1 = vf_coef, c2 = entropy_coef)

for ``ppo_epochs`` passes of minibatches over the rollout, with gradient clipping. β is fixed or adapted
towards a target KL (kl.py). Logged: reward, KL, entropy, both losses, clip fraction, approximate KL
E[(ρ−1) − log ρ], explained variance 1 − Var(R − V)/Var(R), and response length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.config import require
from rlhfkit.rl.advantages import gae, masked_mean, masked_var, whiten
from rlhfkit.rl.kl import KLController, kl_estimator
from rlhfkit.rl.trainer import OnPolicyTrainer, RLConfig
from rlhfkit.rollout import Rollout


@dataclass
class PPOConfig(RLConfig):
    ppo_epochs: int = 4  # passes over each rollout
    minibatch_size: int = 8  # sequences per gradient step
    gamma: float = 1.0  # discount γ
    lam: float = 0.95  # GAE λ
    clip_eps: float = 0.2  # ε of the clipped surrogate
    value_clip: float | None = 0.2  # ε_v; None = unclipped value loss
    vf_coef: float = 0.1  # c1
    entropy_coef: float = 0.0  # c2
    kl_target: float | None = None  # set to use the adaptive KL controller
    kl_horizon: int = 10_000
    whiten_advantages: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.ppo_epochs >= 1, "ppo_epochs", "must be at least 1")
        require(1 <= self.minibatch_size <= self.batch_size, "minibatch_size",
                f"must be between 1 and batch_size ({self.batch_size})")
        require(self.batch_size % self.minibatch_size == 0, "minibatch_size",
                f"{self.minibatch_size} does not divide batch_size {self.batch_size} (the last minibatch would "
                "be smaller and weigh more per sequence)")
        require(0 <= self.gamma <= 1, "gamma", "must be between 0 and 1")
        require(0 <= self.lam <= 1, "lam", "must be between 0 and 1")
        require(self.clip_eps > 0, "clip_eps", "must be positive")
        require(self.value_clip is None or self.value_clip > 0, "value_clip", "must be positive (or null: unclipped)")
        require(self.kl_target is None or self.kl_target > 0, "kl_target", "must be positive (or null: fixed β)")
        # β ← β (1 + e n / horizon) with e ≥ −0.2 stays positive only if 0.2 n / horizon < 1
        require(self.kl_target is None or self.kl_horizon > 0.2 * self.batch_size, "kl_horizon",
                f"must exceed 0.2 × batch_size = {0.2 * self.batch_size:g}, or the adaptive β can turn negative")


def ppo_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
               config: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total PPO loss L = L_clip + c1 L_V − c2 S and its diagnostics (see the module docstring)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - config.clip_eps, 1 + config.clip_eps) * advantages)
    policy_loss = -masked_mean(surrogate, mask)
    value_error = (values - returns) ** 2
    if config.value_clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -config.value_clip, config.value_clip)
        value_error = torch.max(value_error, (clipped - returns) ** 2)
    value_loss = 0.5 * masked_mean(value_error, mask)
    mean_entropy = masked_mean(entropy, mask)
    loss = policy_loss + config.vf_coef * value_loss - config.entropy_coef * mean_entropy
    with torch.no_grad():
        stats = {
            "loss/policy": policy_loss,
            "loss/value": value_loss,
            "loss/total": loss,
            "policy/entropy": mean_entropy,
            "policy/clipfrac": masked_mean(((ratio - 1).abs() > config.clip_eps).float(), mask),
            "policy/approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        }
    return loss, stats


class PPOTrainer(OnPolicyTrainer):
    algorithm = "ppo"
    uses_value_head = True

    def __init__(self, config: PPOConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.kl_controller = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.kl = kl_estimator(config.kl_estimator)

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg, mask, beta = self.config, rollout.mask, self.kl_controller.value
        reused = self.policy_pass(rollout)
        # r_t = −β KL_t, plus the score on the last valid token
        kl = self.kl(rollout.logprobs, rollout.ref_logprobs) * mask
        rewards = -beta * kl
        last = (mask.sum(dim=1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(last), device=rewards.device), last] += rollout.scores
        advantages, returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

        stats: dict[str, list[torch.Tensor]] = {}
        for epoch in range(cfg.ppo_epochs):
            for mb in self.minibatches(len(rollout.batch), cfg.minibatch_size, mask.device):
                first = reused if epoch == 0 else None  # π_θ_old's pass, when one minibatch holds the rollout
                logprobs, entropy, values = first or self.actor(rollout.batch[mb], self.sampling)
                loss, mb_stats = ppo_losses(logprobs, rollout.logprobs[mb], advantages[mb], values,
                                            rollout.values[mb], returns[mb], entropy, mask[mb], cfg)
                mb_stats["policy/grad_norm"] = torch.tensor(self.optimizer_step(loss))
                for key, value in mb_stats.items():
                    stats.setdefault(key, []).append(value)

        # β adapts to the KL of every process's rollouts, so that it stays the same on all of them
        sequence_kl = self.mean_over_processes({"kl": kl.sum(dim=1).mean().item()})["kl"]
        self.kl_controller.update(sequence_kl, len(rollout.batch))
        explained = 1 - masked_var(returns - rollout.values, mask) / masked_var(returns, mask).clamp(min=1e-8)
        return {
            **{key: torch.stack(values).mean().item() for key, values in stats.items()},
            "reward/score": rollout.scores.mean().item(),
            "reward/total": (rollout.scores - beta * kl.sum(dim=1)).mean().item(),
            "kl/kl": sequence_kl,
            "kl/coef": beta,
            "value/explained_variance": explained.item(),
            "response/length": mask.sum(dim=1).mean().item(),
        }

    @property
    def one_minibatch(self) -> bool:
        return self.config.minibatch_size >= self.config.batch_size

    def extra_state(self) -> dict:
        return {"kl_controller": self.kl_controller.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])
