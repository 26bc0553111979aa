"""Pre-packed weights for the rollout engine's forward passes on a CPU.

A decode step multiplies every weight matrix W [out, in] by a few rows x [M, in] (M = the rollout's
sequences): y = x Wᵀ + b. At such small M a plain ``F.linear`` spends most of its time not multiplying
but re-laying W out into the blocked format its kernel reads, on every call. ``packed_weights`` does
that once: inside it every ``nn.Linear`` (and GPT-2's ``Conv1D``, y = x W + b with W [in, out]) of the
model computes y = x Wᵀ + b with oneDNN's inner product on W reordered once
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``: what ``torch.compile``'s
freezing pass emits for a CPU linear). The arithmetic is the same (each y_j a dot product of x with
W_j in the weights' dtype, fp32 accumulation); only the summation order inside a dot product differs.

Sibling layers that read the same input (``SIBLINGS``: a Llama-style attention's q, k and v, a gated MLP's
gate and up) are packed as one weight [W₁; W₂; …] and multiplied once per input: each layer's forward returns
a copy of its slice of that product (``sibling_groups``; only plain layers, not those LoRA wraps nor those with
forward pre-hooks). The product of an input is reused only by the siblings it has not served yet and while the
input is unchanged (its ``_version``; not seen: a write through ``x.data``, or to an inference tensor, which
tracks no version, between two siblings' calls; HF models make neither). Bit for bit the
outputs of the layers multiplied one by one (SmolLM2-135M, fp32 and bf16); one product of 960 outputs
instead of three and one of 3072 instead of two per layer took a SmolLM2 decode step from 36.9 to 31.1 ms
(bf16, 8 rows, 2 threads, idle, with the products called directly; 33 ms through the layers' forwards).
Copying the slices (rather than returning views of the product, which a caller could write into) costs 4 to 7 µs
a q/k/v product more than views at those shapes (fp32 / bf16, 8 rows, 1 thread, a busy machine): about 0.3 ms of
that 33 ms step, estimated from 60 products a step, not timed end to end.

Why oneDNN's op and not MKL's (``torch.ops.mkl._mkl_linear``, what inductor emits for fp32) nor
``torch.utils.mkldnn.to_mkldnn``'s ``MkldnnLinear``: ms per product at SmolLM2-135M's shapes, 8 rows, 1
thread, interleaved, on a 2-core EPYC with AVX512-BF16 (torch 2.13; plain ``F.linear`` / oneDNN packed /
MKL packed / MkldnnLinear): fp32 576→1536 0.32 / 0.23 / 0.39 / 0.41, 1536→576 0.29 / 0.20 / 0.35 / 0.36,
576→49152 (the LM head) 18.4 / 8.5 / 15.7 / 13.8; bf16 576→1536 0.14 / 0.09 / – / 0.18, 576→49152 8.1 /
4.0 / – / 8.6. At 2 threads the packed LM head is 3.1× faster in fp32 (15.9 / 5.1 ms): the plain
product's relayout does not spread over threads.

Under a CPU bf16 autocast (the RL trainers sample under it) a layer is packed from W rounded to bf16
and fed x rounded to bf16, as autocast's linear computes: autocast's cast of W at every call goes too.

A layer is packed at its first call inside the context (so in the autocast dtype of that call); the
rest of the call reuses that copy, so every rollout reads the weights as they are at its start. What
happens to the copy at exit depends on whether the weight can change:

* a trainable weight (``requires_grad``: full fine-tuning, LoRA's A and B) is packed again at every call
  and its copy dropped at exit: the next optimizer step changes it anyway, and keeping the copy through
  the update would add its size to the training step's peak memory;
* a frozen weight (``requires_grad=False``: LoRA's base layers, any model inside ``keep_packed_weights``,
  which ``rlhfkit generate`` and evaluation enter) keeps its packed copy between calls, in ``_KEPT``,
  weakly keyed by the layer (freed with the model, at the exit of ``keep_packed_weights`` for the weights
  it froze, or now by ``forget_packed_weights``; ``KEEP_FROZEN = False`` turns keeping off). At
  the next call the copy is reused only if the weight is provably the one packed, checked per layer
  without reading it (``weight_state``): the same storage object (a weak reference: ``param.data = t``,
  ``.to(dtype)``, a new ``nn.Parameter`` give another), data pointer, shape, strides and dtype, the same
  ``tensor._version`` (bumped by every in-place write through the tensor: an optimizer step,
  ``load_state_dict``, ``copy_``) and, for the base layer of a peft LoRA layer, the same merged adapters
  and the same layer wrapping it or none (peft merges by writing ``weight.data`` in place, which bumps no
  version, and ``merge_and_unload`` drops the LoRA layer); and it was packed for one row
  exactly when this call has one row (oneDNN lays W out for the row count it is given: in fp32 the LM head
  packed for 1 row takes 13.9 ms at 8 rows against 8.4 packed for 8 and 8.8 packed for 32; 8 and 32 are
  interchangeable, 1 thread, loaded machine). Else it is packed again.
  Not seen, so not to be done to a frozen weight between two rollouts without ``forget_packed_weights``:
  other in-place writes through ``weight.data`` or through a tensor assigned with ``param.data = t`` (TRL's
  reference-model sync writes so). The same holds for the compiled engine's frozen graph, which
  ``forget_packed_weights`` drops too.
  The cost: a packed copy of every frozen linear weight while the model lives (as large as those weights
  in the dtype the products run in: SmolLM2-135M 513 MiB fp32, 257 MiB bf16 or under bf16 autocast).

Measured (SmolLM2-135M, 2 threads, idle): packing every weight costs 162 ms fp32 / 87 ms bf16, about two
decode steps of a 32-token call. Keeping it (benchmarks/README.md, 1 thread, a busy machine, CPU seconds
per call of 2 prompts × 4 samples × 32 tokens): fp32 2.77 → 2.34 s, bf16 1.66 → 1.56 s; an RL rollout
with LoRA under bf16 autocast, base weights kept and adapters packed, 2.88 → 2.75 s (4%).

A tied lm_head has its own copy; the embedding stays as it is. peft's LoRA layers keep working: their
base layer and the active adapter's matrices are linear layers and are packed like any other, the LoRA sum
is untouched; the other adapters' matrices, which no forward calls, are neither walked nor packed
(``base_modules``). Layers whose ``forward`` was already replaced on the instance (accelerate's hooks) run as they
are. Where packing cannot run (not a CPU, no oneDNN, a dtype oneDNN cannot multiply here, gradients
wanted: for a trainable weight or bias, or an input that requires them) the layer runs its plain forward and a
one-line warning says why, once per reason; an input of a dtype the plain layer refuses goes to it, to be refused.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

_WARNED: set[str] = set()
KEEP_FROZEN = True  # False: frozen weights are packed again at every call, like trainable ones


@dataclass
class _KeptPack:
    packed: torch.Tensor  # oneDNN's blocked copy of W (Wᵀ for Conv1D; [W₁; W₂; …] for siblings) in the compute dtype
    layers: tuple[int, ...]  # id of each layer packed in it (the first, then its siblings)
    storages: tuple[weakref.ref, ...]  # each weight's storage when packed: dead once freed, never taken for a new one
    state: tuple  # weight_state of each weight when packed
    single_row: bool  # packed for products of one row (see the module docstring)


# first layer → {compute dtype: the kept packed weight of the layers packed with it}: one copy per layer and dtype,
# replaced when the layer is packed with other siblings (or alone). Weakly keyed: freed with its first layer.
_KEPT: weakref.WeakKeyDictionary[torch.nn.Module, dict[torch.dtype, _KeptPack]] = weakref.WeakKeyDictionary()


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


def product_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype ``F.linear(x, weight)`` multiplies in: autocast's where it is on and casts both (floating, not
    float64), else the weight's where ``x`` has it; None where the plain layer refuses ``x`` (of another dtype)."""
    if torch.is_autocast_enabled(x.device.type) and all(t.is_floating_point() and t.dtype != torch.float64
                                                        for t in (x, weight)):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype if x.dtype == weight.dtype else None


def weight_state(weight: torch.Tensor, owner: torch.nn.Module | None) -> tuple | None:
    """What changes whenever a frozen ``weight``'s values change by the usual routes (see the module docstring),
    read without reading the values; None where its copy is not kept (trainable, an inference tensor, which
    tracks no version, or keeping off). ``owner``: the peft LoRA layer whose base layer holds ``weight``."""
    if not KEEP_FROZEN or weight.requires_grad or weight.is_inference():
        return None
    merged = (True, *owner.merged_adapters) if owner is not None else (False,)  # merge_and_unload drops the owner
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape), weight.stride(), merged


def _pack(modules: Sequence[torch.nn.Module], dtype: torch.dtype, rows: int,
          owner: torch.nn.Module | None) -> torch.Tensor:
    """The weights of ``modules`` (one layer, or sibling layers reading the same input, stacked by output) packed
    for products in ``dtype``: the kept copy where it provably still holds the weights, else packed now (and
    kept if every weight is frozen)."""
    first, weights = modules[0], [module.weight for module in modules]
    states = tuple(weight_state(weight, owner) for weight in weights)
    layers = tuple(id(module) for module in modules)
    if None in states:
        _KEPT.pop(first, None)
    else:
        kept = _KEPT.get(first, {}).get(dtype)
        if (kept is not None and kept.layers == layers and kept.state == states and kept.single_row == (rows == 1)
                and all(ref() is weight.untyped_storage() for ref, weight in zip(kept.storages, weights, strict=True))):
            return kept.packed
    w = torch.cat([(m.weight.t() if isinstance(m, Conv1D) else m.weight).to(dtype) for m in modules]).contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)  # Conv1D keeps W as [in, out]
    if None not in states:
        storages = tuple(weakref.ref(weight.untyped_storage()) for weight in weights)
        _KEPT.setdefault(first, {})[dtype] = _KeptPack(packed, layers, storages, states, rows == 1)
    return packed


class _PackedProduct:
    """y = x [W₁; W₂; …]ᵀ + [b₁; b₂; …] for one layer, or for sibling layers that read the same input (a
    layer's q, k and v; a gated MLP's gate and up: ``sibling_groups``), on their weights packed together at the
    first call in each compute dtype. Each sibling's forward returns a copy of its slice of the product (its own
    contiguous tensor, as its plain forward returns: writing into it changes no other output); the product of the
    last input (the same tensor object, unchanged since: ``tensor._version``, which an inference tensor does not
    track) is reused by the siblings it has not served yet, so the siblings of one input cost one product and a
    sibling called again multiplies again."""

    def __init__(self, modules: Sequence[torch.nn.Module], rows: int, owner: torch.nn.Module | None) -> None:
        self.modules, self.rows, self.owner = tuple(modules), rows, owner
        self.packed: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None] | None] = {}  # None: cannot pack
        self.last: tuple | None = None  # (x, its version, dtype, y, the siblings served) of the last product
        widths = [m.weight.shape[0] for m in self.modules]  # not out_features, which nothing keeps up to date
        ends = list(itertools.accumulate(widths))
        self.slices = [slice(end - width, end) for width, end in zip(widths, ends, strict=True)] \
            if len(modules) > 1 else [slice(None)]

    def forward_of(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The packed forward of ``self.modules[index]``: its slice of the product."""
        module = self.modules[index]
        plain, part = module.forward, self.slices[index]

        def forward(x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in self.modules
                                                                   for p in m.parameters(recurse=False))):
                _warn_once("gradients are wanted: the packed product has no backward")
                return plain(x)
            dtype = product_dtype(x, module.weight)
            if dtype is None:  # the plain layer refuses x: it says why
                return plain(x)
            if dtype not in self.packed:
                self.packed[dtype] = self._pack(x.device, dtype)
            if self.packed[dtype] is None:
                return plain(x)
            if len(self.modules) == 1:
                return self._product(x, dtype)
            version = None if x.is_inference() else x._version  # an inference tensor tracks no version
            last = self.last  # read once: another thread's product is never taken for this one's
            if last is None or last[0] is not x or last[1:3] != (version, dtype) or index in last[4]:
                last = self.last = (x, version, dtype, self._product(x, dtype), set())
            last[4].add(index)
            return last[3][..., part].clone(memory_format=torch.contiguous_format)

        return forward

    def _pack(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        reason = unpackable_reason(device, dtype) or unpackable_reason(self.modules[0].weight.device, dtype)
        if reason is not None:
            _warn_once(reason)
            return None
        biases = [m.bias for m in self.modules]
        bias = None if biases[0] is None else torch.cat([b.to(dtype) for b in biases])
        return _pack(self.modules, dtype, self.rows, self.owner), bias

    def _product(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w, b = self.packed[dtype]
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), w, b, "none", [], "")


def base_modules(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module.modules()`` without the layers of the peft adapters that are not active (a LoRA layer's
    ``lora_A``, ``lora_B``... of every other adapter loaded), which no forward calls: a process serving an
    adapter per user holds hundreds, and walking and packing them all at every answer made an answer of the
    toy model take 0.39 s instead of 0.11 s with 400 adapters loaded (benchmarks/personal_serving.py)."""
    yield module
    adapters = {*getattr(module, "adapter_layer_names", ()), *getattr(module, "other_param_names", ())}
    active = set(getattr(module, "active_adapters", ())) if adapters else set()
    for name, child in module.named_children():
        if name not in adapters:
            yield from base_modules(child)
        elif isinstance(child, torch.nn.ModuleDict):
            for key, layer in child.items():
                if key in active:
                    yield from base_modules(layer)


def packable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers ``packed_weights`` packs: every ``nn.Linear`` and ``Conv1D`` of ``base_modules`` (not
    subclasses, whose forward may differ) whose forward was not replaced on the instance."""
    return [module for module in base_modules(model)
            if type(module) in (torch.nn.Linear, Conv1D) and "forward" not in vars(module)]


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # children that read the same input


def sibling_groups(model: torch.nn.Module, packable: Sequence[torch.nn.Module]) -> list[tuple[torch.nn.Module, ...]]:
    """Sibling ``nn.Linear`` layers multiplied as one product (``SIBLINGS`` of one parent: Llama-style attention
    and gated MLPs), where all of them are packable, plain (not wrapped by LoRA), without forward pre-hooks (which
    may set a layer's weight just before its own call, as ``torch.nn.utils.prune`` does: too late for a product
    run at its sibling's call), of one input width, dtype and device, and all with or all without a bias."""
    packable, groups = set(packable), []
    for parent in base_modules(model):
        for names in SIBLINGS:
            layers = tuple(getattr(parent, name, None) for name in names)
            if (all(type(layer) is torch.nn.Linear and layer in packable and not layer._forward_pre_hooks
                    for layer in layers)
                    and len({(layer.weight.shape[1], layer.weight.dtype, layer.weight.device, layer.bias is None)
                             for layer in layers}) == 1):
                groups.append(layers)
    return groups


def lora_owners(model: torch.nn.Module) -> dict[torch.nn.Module, torch.nn.Module]:
    """Base layer → the peft tuner layer (LoRA...) that wraps it and may merge adapters into its weight."""
    return {module.base_layer: module for module in base_modules(model)
            if hasattr(module, "merged_adapters") and isinstance(getattr(module, "base_layer", None),
                                                                  torch.nn.Module)}


@contextmanager
def packed_weights(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """Inside: every layer of ``packable_layers(model)`` multiplies by its weight packed for products of
    ``rows`` rows (the decode step's; any row count works), packed at its first call or kept from an earlier
    context (frozen weights, unchanged; see the module docstring); outside: the plain layers."""
    swapped = packable_layers(model)
    owners = lora_owners(model)
    groups = sibling_groups(model, swapped)
    grouped = {module for group in groups for module in group}
    for group in groups + [(module,) for module in swapped if module not in grouped]:
        product = _PackedProduct(group, rows, owners.get(group[0]))
        for index, module in enumerate(group):
            module.forward = product.forward_of(index)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


@contextmanager
def keep_packed_weights(model: torch.nn.Module) -> Iterator[None]:
    """For jobs that only sample from ``model`` (``rlhfkit generate``, evaluation): inside, its parameters are
    frozen, so every engine call after the first reuses the packed weights; on exit, even by an exception,
    each parameter's ``requires_grad`` is restored and the kept copies of the weights it froze are freed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        froze = {id(parameter) for parameter in trainable}
        layers = {id(module) for module in model.modules() if id(getattr(module, "weight", None)) in froze}
        for module in model.modules():  # every copy holding a weight it froze, siblings' products too
            kept = _KEPT.get(module, {})
            for dtype in [dtype for dtype, pack in kept.items() if layers.intersection(pack.layers)]:
                del kept[dtype]


def forget_packed_weights(model: torch.nn.Module) -> None:
    """Free the packed copies kept for ``model``'s frozen weights now (they are packed again at the next call),
    and the compiled decode step kept on it where its graph holds frozen weights as constants
    (``rlhfkit.models.engine.compiled_step``: compiled again at the next compiled call)."""
    from rlhfkit.models.engine import COMPILED_ATTRIBUTE

    for module in model.modules():
        _KEPT.pop(module, None)
        if getattr(module.__dict__.get(COMPILED_ATTRIBUTE), "frozen", None) is not None:
            del module.__dict__[COMPILED_ATTRIBUTE]


def kept_packed_mib(model: torch.nn.Module) -> float:
    """MiB of packed copies kept for ``model``'s layers between calls."""
    return sum(kept.packed.numel() * kept.packed.element_size() for module in model.modules()
               for kept in _KEPT.get(module, {}).values()) / 2**20
