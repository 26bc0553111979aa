"""A guarded optimiser update: a loss or gradient norm that is NaN or infinite stops training before the
weights take it in (so no NaN model is ever saved), on every process at once under `accelerate`."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator


class TrainingDiverged(ValueError):
    """A non-finite loss or gradient norm: the update was not applied, and training stops."""


def apply_gradients(accelerator: Accelerator, actor: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    loss: torch.Tensor, max_grad_norm: float) -> float:
    """Backward, clip, step; returns the gradient norm before clipping. A loss or gradient norm that is
    NaN or infinite raises :class:`TrainingDiverged` before the step, so the weights never take it in
    (on every process at once under DDP: the verdict is summed over them)."""
    optimizer.zero_grad()
    accelerator.backward(loss)
    norm = float(accelerator.clip_grad_norm_(actor.parameters(), max_grad_norm))
    finite = math.isfinite(norm) and math.isfinite(loss.item())
    diverged = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        diverged = accelerator.reduce(diverged, reduction="sum")
    if diverged.item():
        optimizer.zero_grad()
        raise TrainingDiverged(f"loss {loss.item():.4g}, gradient norm {norm:.4g}: not finite (on this or another "
                               "process); the update was not applied")
    optimizer.step()
    return norm
