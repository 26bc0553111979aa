"""A guarded optimiser update: a loss or gradient norm that is NaN or infinite stops training before the
weights take it in (so no NaN model is ever saved)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class TrainingDiverged(ValueError):
    """A non-finite loss or gradient norm: the update was not applied, and training stops."""


def guarded_step(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.nn.Parameter], loss: torch.Tensor,
                 max_grad_norm: float, where: str) -> float:
    """Backward, clip to ``max_grad_norm``, step; returns the gradient norm before clipping. A non-finite loss
    or norm raises :class:`TrainingDiverged` naming ``where`` (e.g. "SFT stopped in epoch 2") instead."""
    optimizer.zero_grad()
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm))
    if not (math.isfinite(loss.item()) and math.isfinite(norm)):
        optimizer.zero_grad()
        raise TrainingDiverged(f"{where}: loss {loss.item():.4g}, gradient norm {norm:.4g}: not finite; the update "
                               "was not applied and nothing was saved")
    optimizer.step()
    return norm
