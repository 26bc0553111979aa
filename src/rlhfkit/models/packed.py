"""Pre-packed weights for the rollout engine's forward passes on a CPU.

A decode step multiplies every weight matrix W [out, in] by a few rows x [M, in] (M = the rollout's
sequences): y = x Wᵀ + b. At such small M a plain ``F.linear`` spends most of its time not multiplying
but re-laying W out into the blocked format its kernel reads, on every call. ``packed_weights`` does
that once: inside it every ``nn.Linear`` (and GPT-2's ``Conv1D``, y = x W + b with W [in, out]) of the
model computes y = x Wᵀ + b with oneDNN's inner product on W reordered once
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``: what ``torch.compile``'s
freezing pass emits for a CPU linear). The arithmetic is the same (each y_j a dot product of x with
W_j in the weights' dtype, fp32 accumulation); only the summation order inside a dot product differs.

Why oneDNN's op and not MKL's (``torch.ops.mkl._mkl_linear``, what inductor emits for fp32) nor
``torch.utils.mkldnn.to_mkldnn``'s ``MkldnnLinear``: ms per product at SmolLM2-135M's shapes, 8 rows, 1
thread, interleaved, on a 2-core EPYC with AVX512-BF16 (torch 2.13; plain ``F.linear`` / oneDNN packed /
MKL packed / MkldnnLinear): fp32 576→1536 0.32 / 0.23 / 0.39 / 0.41, 1536→576 0.29 / 0.20 / 0.35 / 0.36,
576→49152 (the LM head) 18.4 / 8.5 / 15.7 / 13.8; bf16 576→1536 0.14 / 0.09 / – / 0.18, 576→49152 8.1 /
4.0 / – / 8.6. At 2 threads the packed LM head is 3.1× faster in fp32 (15.9 / 5.1 ms): the plain
product's relayout does not spread over threads.

Under a CPU bf16 autocast (the RL trainers sample under it) a layer is packed from W rounded to bf16
and fed x rounded to bf16, as autocast's linear computes: autocast's cast of W at every call goes too.

A layer is packed at its first call inside the context (so in the autocast dtype of that call) and the
packed copy dropped at exit: every rollout reads the weights as they are at its start (an optimizer
step in between is seen), for the price of one reorder of every weight per rollout (about one decode
step) and, during the rollout, a packed copy of every linear layer's weight (a tied lm_head has its
own copy; the embedding stays as it is). peft's LoRA layers keep working: their base layer and adapter
matrices are linear layers and are packed like any other, the LoRA sum is untouched. Layers whose
``forward`` was already replaced on the instance (accelerate's hooks) run as they are. Where
packing cannot run (not a CPU, no oneDNN, a dtype oneDNN cannot multiply here, gradients wanted) the
layer runs its plain forward and a one-line warning says why, once per reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers.pytorch_utils import Conv1D

_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"rollout engine: packed weights off ({reason}); plain matrix products", RuntimeWarning,
                      stacklevel=4)


def unpackable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a product with weights of ``dtype`` on ``device`` cannot run packed here, None where it can."""
    if device.type != "cpu":
        return f"device {device.type}: oneDNN packing is for CPUs"
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return "this torch has no oneDNN (mkldnn)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bf16 instructions oneDNN uses"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"weights in {dtype}: packed for float32 and bfloat16 only"
    return None


def _packed_forward(module: torch.nn.Module, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward as y = x Wᵀ + b on W packed at its first call (in the dtype it computes in)."""
    plain = module.forward
    transposed = isinstance(module, Conv1D)  # GPT-2's Conv1D keeps W as [in, out]
    packed: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None] | None] = {}  # None: cannot pack

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        if torch.is_grad_enabled() and weight.requires_grad:
            _warn_once("gradients are wanted: the packed product has no backward")
            return plain(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else weight.dtype
        if dtype not in packed:
            reason = unpackable_reason(x.device, dtype)
            if reason is not None:
                _warn_once(reason)
                packed[dtype] = None
            else:
                w = (weight.t() if transposed else weight).to(dtype).contiguous()
                packed[dtype] = (torch.ops.mkldnn._reorder_linear_weight(w, rows),
                                 None if bias is None else bias.to(dtype))
        if packed[dtype] is None:
            return plain(x)
        w, b = packed[dtype]
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), w, b, "none", [], "")

    return forward


def packable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers ``packed_weights`` packs: every ``nn.Linear`` and ``Conv1D`` (not subclasses, whose forward
    may differ) whose forward was not replaced on the instance."""
    return [module for module in model.modules()
            if type(module) in (torch.nn.Linear, Conv1D) and "forward" not in vars(module)]


@contextmanager
def packed_weights(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """Inside: every layer of ``packable_layers(model)`` multiplies by its weight packed once for products
    of ``rows`` rows (the decode step's; any row count works); outside: the plain layers."""
    swapped = packable_layers(model)
    for module in swapped:
        module.forward = _packed_forward(module, rows)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward
