"""Faster kernels for the same function while a model trains: eager attention where PyTorch's fused CPU
attention is slow in bf16, and the GELU in one kernel instead of a chain of them.

Attention. Under bf16 autocast on a CPU, ``scaled_dot_product_attention`` (transformers' "sdpa", its
default) runs a flash-attention kernel that is slower than the eager softmax(QKᵀ/√d + M)·V for short
sequences. Forward + backward of one attention, bf16, 1 thread, sdpa / eager time (a 2-core AMD EPYC
with AVX512-BF16, torch 2.13): 4.5× at [16 sequences, 4 heads, 49 tokens, 64 dims], 2.9-4.1× at 64
tokens, 1.8-2.1× at 128, 0.9-1.2× at 192, 0.85-1.4× at 256, 0.46-1.24× at 384 (heads of 32 and 64
dims, 4 and 12 heads). In fp32 the two are equal at 49 tokens and sdpa is 3× faster at 256. So eager
is used only under bf16 on a CPU and only where no sequence exceeds :data:`EAGER_ATTENTION_MAX_TOKENS`;
a GPU keeps its fused kernel.

GELU. GPT-2's ``gelu_new`` (``NewGELUActivation``) computes the tanh approximation of GELU(x) = x Φ(x),

    GELU(x) ≈ ½ x (1 + tanh(√(2/π) (x + 0.044715 x³))),

as eight element-wise operations, each a pass over memory and a node in the backward graph;
``GELUTanh`` computes the same function in one (``F.gelu(x, approximate="tanh")``), equal up to float
rounding (transformers documents the two as equivalent). Under bf16 on a CPU the exact x Φ(x)
(``GELUActivation``, ``F.gelu(x)``) is used instead: PyTorch's CPU tanh kernel is 4× slower than its erf
one (forward + backward of [784, 1024] values, 1 thread: 3.2 ms against 1.0 ms, in bf16 and in fp32),
and the two functions are at most :data:`TANH_GELU_MAX_ERROR` apart (at x ≈ 2.69), less than bf16's own
rounding of any output of magnitude 1/8 or more (half a unit in the last place: 2⁻¹¹ ≈ 4.9e-4 and up).

Measured on the shared benchmark's reward model (5.3M-parameter GPT-2, 16 sequences of 49 tokens, bf16
autocast, 1 thread, CPU seconds per training step, runs interleaved): 158 ms as the model comes, 129 ms
with eager attention, 123 ms with the one-kernel tanh GELU as well; 115.5 → 107.7 ms with the erf GELU
instead of the tanh one (measured later, under another load). The whole reward-model training step of
``benchmarks/reward_model.py`` (1 thread, CPU seconds, runs alternated): at the workload's seed 0.146 and
0.150 s before, 0.119 and 0.120 s after, TRL's 0.248 and 0.235 s (ratio 0.61 → 0.49); over 3 seeds the
same pair accuracy over the last 5 steps (1.00, 1.00, 0.95) and peak RSS 632-635 MiB instead of 649-678.
``torch.compile`` of the model on top gave 10% more but took 46 s to compile (about 4000 steps to pay
back), so it is not used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.activations import FastGELUActivation, GELUActivation, GELUTanh, NewGELUActivation

from rlhfkit.precision import Precision

EAGER_ATTENTION_MAX_TOKENS = 128  # at most this long, eager attention beat sdpa ≥ 1.7× in bf16 on CPU (above)
TANH_GELUS = (NewGELUActivation, FastGELUActivation, GELUTanh)  # the tanh-approximated GELU, in Python or in C
TANH_GELU_MAX_ERROR = 4.74e-4  # max_x |tanh GELU(x) − x Φ(x)|: 4.73e-4 exactly, 4.74e-4 by the float32 kernels


def faster_attention(precision: Precision, max_tokens: int) -> str | None:
    """The attention implementation to train with: "eager" under bf16 on a CPU for sequences of at most
    :data:`EAGER_ATTENTION_MAX_TOKENS` tokens, else None (the model's own)."""
    bf16_cpu = precision.dtype == torch.bfloat16 and precision.device_type == "cpu"
    return "eager" if bf16_cpu and max_tokens <= EAGER_ATTENTION_MAX_TOKENS else None


def faster_gelu(precision: Precision) -> type[torch.nn.Module]:
    """The GELU to train with in place of a tanh GELU: the exact x Φ(x) under bf16 on a CPU (4× faster there,
    and within bf16's rounding of outputs of magnitude 1/8 or more), else the tanh approximation in one kernel."""
    bf16_cpu = precision.dtype == torch.bfloat16 and precision.device_type == "cpu"
    return GELUActivation if bf16_cpu else GELUTanh


@contextmanager
def training_kernels(model: torch.nn.Module, precision: Precision, max_tokens: int) -> Iterator[None]:
    """Inside: ``model`` attends with :func:`faster_attention` (where the model uses sdpa) and its tanh GELUs
    are :func:`faster_gelu`'s; on exit, even by an exception, it has its own attention and modules back."""
    own_attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    attention = faster_attention(precision, max_tokens) if own_attention == "sdpa" else None
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) in TANH_GELUS]
    gelu = faster_gelu(precision)
    for parent, name, _ in swapped:
        setattr(parent, name, gelu())
    if attention is not None:
        model.set_attn_implementation(attention)
    try:
        yield
    finally:
        if attention is not None:
            model.set_attn_implementation(own_attention)
        for parent, name, child in swapped:
            setattr(parent, name, child)
