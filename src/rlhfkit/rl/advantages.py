"""Advantage estimators: GAE for PPO's value-based critic, group baselines for GRPO and RLOO.

Tensors are [batch, T] over completion tokens with a 0/1 ``mask`` (1 up to and including EOS).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the valid tokens; with ``shift_mean=False`` the mean is added back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016):

        δ_t = r_t + γ V_{t+1} − V_t                   (V_{T} = 0 after the last valid token)
        A_t = δ_t + γ λ A_{t+1}
        R_t = A_t + V_t                               (the value targets, "returns")

    Returns (advantages, returns), both zero on padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        # across padding, carry the value and advantage of the next valid token unchanged (zeros)
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def group_normalized(scores: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i − mean_group(r)) / std_group(r), one value per completion.
    Completions of one prompt are consecutive, ``group_size`` of them."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i − mean_{j≠i} r_j = (G r_i − Σ_j r_j) / (G − 1)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt")
    groups = scores.view(-1, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)
