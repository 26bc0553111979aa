"""Mixed precision: bf16 autocast where the hardware multiplies bf16 natively, fp32 everywhere else.

Under ``torch.autocast(dtype=torch.bfloat16)`` matrix products read their inputs rounded to bf16 (8 bits
of mantissa, fp32's range) and accumulate in fp32; the weights the optimiser updates, their gradients
and AdamW's moments stay fp32 (master weights: an update below bf16's resolution is not rounded away),
and log-probs come from logits cast to fp32 (``token_logprobs``), so a ratio π_θ/π_θ_old and a KL
estimate compare two numbers computed the same way.

``precision`` is "auto" (bf16 where :func:`bf16_unit` finds a unit for it, fp32 otherwise), "bf16"
(an error on hardware without one, where bf16 would be emulated) or "fp32".

Each trainer enters its own autocast (:meth:`Precision.autocast`) instead of passing
``mixed_precision`` to `accelerate`: that setting is process-wide state there (a second ``Accelerator``
with another one raises), and a demo or a test suite trains several models in one process.

Measured, bf16 / fp32 speed (CPU seconds, 1 thread, runs interleaved; a 2-core AMD EPYC with AVX512-BF16,
torch 2.13): forward + backward + AdamW 1.71× on the 5.3M-parameter benchmark policy ([32, 49] tokens),
1.61× on SmolLM2-135M ([8, 96]), 1.54× with LoRA; sampling 1.14× and 1.26×, but 0.75-0.84× with LoRA
(not autocast re-casting the frozen base at every token: holding it in bf16 while sampling did not
help; the adapters' small extra products per layer are the likely cost, not measured apart); a whole
step on the benchmark workload 1.42× (GRPO) and 1.36× (PPO), a PPO step with the smollm2 demo's settings
(LoRA) 1.13×. On the benchmark workload itself (``benchmarks/rl_workload.py``, 2 threads, wall clock,
other processes' CPU ≤ 8 s per run) the median step is 1.45-1.48× faster for DPO, 1.20-1.67× for GRPO,
1.30× for PPO and 1.39× for RLOO, peak memory 10-15% lower, and the trends the benchmark prints are the
same within noise (DPO margin 0.023 → 0.352 in both; GRPO reward 0.096 → 0.126 in fp32, 0.097 → 0.127 in
bf16). Even the 5.3M-parameter model gains, so "auto" has no size rule.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator

from rlhfkit.config import FieldError
from rlhfkit.console import console

PrecisionSetting = Literal["auto", "bf16", "fp32"]
CPU_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}  # /proc/cpuinfo flag → name, best first


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")),
                set())


def bf16_unit(device: torch.device, flags: set[str] | None = None) -> str | None:
    """The name of what computes bf16 natively on ``device``, or None: a CUDA GPU of compute capability
    8.0 or more ("CUDA bf16"), a CPU with AMX-BF16 or AVX512-BF16 (``flags``: the CPU's, read from
    /proc/cpuinfo unless given)."""
    if device.type == "cuda":
        return "CUDA bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    return next((name for flag, name in CPU_BF16_FLAGS.items() if flag in flags), None)


@dataclass(frozen=True)
class Precision:
    """The precision a trainer runs in: ``dtype`` bf16 (autocast) or None (fp32), and why."""

    dtype: torch.dtype | None
    device_type: str
    reason: str

    def autocast(self) -> AbstractContextManager:
        """The region where matrix products run in bf16 (a no-op in fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    def autocast_forward(self, module: torch.nn.Module) -> None:
        """Every call of ``module`` from now on runs under :meth:`autocast` (a fresh context per call: one
        autocast object entered twice, nested, would restore the wrong state on exit)."""
        forward = module.forward

        def forward_in_precision(*args, **kwargs):
            with self.autocast():
                return forward(*args, **kwargs)

        module.forward = forward_in_precision

    def __str__(self) -> str:
        return f"{'bf16 autocast' if self.dtype is not None else 'fp32'} ({self.reason})"


def training_precision(config, accelerator: Accelerator, report: bool = True) -> Precision:
    """``config.precision`` resolved on the accelerator's device, said once on the console (``report``)."""
    precision = resolve_precision(config.precision, accelerator.device)
    if report and accelerator.is_main_process:
        console.print(f"precision: {precision}", highlight=False)
    return precision


def resolve_precision(setting: PrecisionSetting, device: torch.device, flags: set[str] | None = None) -> Precision:
    """``setting`` on ``device``: "auto" is bf16 where :func:`bf16_unit` finds a unit, else fp32; "bf16"
    without one is a FieldError naming the field and the way out."""
    if setting not in ("auto", "bf16", "fp32"):
        raise FieldError("precision", f"must be auto, bf16 or fp32, got {setting!r}")
    if setting == "fp32":
        return Precision(None, device.type, "as configured")
    unit = bf16_unit(device, flags)
    if setting == "bf16" and unit is None:
        raise FieldError("precision", f"bf16 needs a CUDA GPU with bf16 or a CPU with AMX-BF16 or AVX512-BF16; this "
                                      f"{device.type} has none (bf16 would be emulated): use auto or fp32")
    if unit is None:
        return Precision(None, device.type, f"no bf16 unit on this {device.type}")
    return Precision(torch.bfloat16, device.type, f"{unit} detected")
