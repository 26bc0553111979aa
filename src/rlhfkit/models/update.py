"""A guarded optimiser update: a loss or gradient norm that is NaN or infinite stops training before the
weights take it in (so no NaN model is ever saved), on every process at once under `accelerate`."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator


def adamw(parameters, lr: float, device: torch.device, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable ``parameters``, fused (one kernel over every tensor) on CPU and CUDA: on this
    CPU its step was 2.9× (5.3M parameters) to 6.5× (135M) faster than the per-tensor loop, equal to 3e-8."""
    return torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=lr, weight_decay=weight_decay,
                             fused=device.type in ("cpu", "cuda"))


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
