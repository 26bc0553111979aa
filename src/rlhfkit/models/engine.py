"""The rollout engine: n completions per prompt from a causal LM, sampled from exactly softmax(logits / τ).

Every generation in rlhfkit (rollouts, `rlhfkit generate`, CAI critiques, evaluation) goes through
``sample_completions``. For a causal LM with a static-cache implementation in transformers (GPT-2,
Llama, SmolLM2, Qwen, Mistral...) it runs ``kv_cached_sampling``, which does the same work as
``model.generate`` with less of it:

* each prompt is read once (prefill) and its KV is shared by its n samples (``generate`` repeats the
  prompt n times before prefill);
* the KV cache is allocated once for prompt + ``max_new_tokens`` (transformers' ``StaticCache``);
* the next token is drawn by inverse-CDF sampling, y = min{i : F_i > u·F_V} with F the cumulative sum of
  the probabilities and u ~ U[0, 1): an exact draw from the categorical, 10-20× cheaper on CPU than
  ``torch.multinomial`` at a vocabulary of 8k-50k;
* no logits-processor machinery: EOS forbidden (logit −∞) before ``min_new_tokens``, then
  p = softmax(z / τ), optionally cut to the top-k tokens and the top-p mass as transformers does; greedy
  takes argmax z;
* the loop stops as soon as every sequence has emitted EOS;
* on a CPU every linear layer multiplies by its weight packed into oneDNN's blocked layout
  (``rlhfkit.models.packed``: once per call, or once for as long as a frozen weight is unchanged), where a
  plain ``F.linear`` at a decode step's few rows re-lays the weight out at every call: the same products,
  summed in another order (``packed=False`` turns it off);
* the decode steps of Llama-style models and GPT-2 run a written-out forward (``rlhfkit.models.decode``):
  the model's own layers, without transformers' per-call plumbing; other models run their own forward.

``compiled_kv_cached_sampling`` (``rlhfkit generate --compile``) runs the decode steps (not the prefill, whose
length varies) through ``torch.compile`` (``compiled_step``): the written-out step where the model has one, else
its forward; one graph per row count and cache length, the cache length rounded up to a multiple of 64 so that
prompts of different lengths share a graph. Where every weight is frozen (``rlhfkit generate`` freezes them for
its run) the graph is compiled with inductor's ``freezing``: the weights become constants of the graph, packed
once for the CPU's matrix kernels (MKL's packed fp32 GEMM on an Intel CPU) and the step around them fused; that
is what pays. A change to a frozen weight compiles the graph again (``frozen_state`` is checked at every call),
as does a forward hook added or removed (dynamo does not guard on hooks); not seen, as for the packed weights
(``rlhfkit.models.packed``): an in-place write through ``weight.data``, which bumps no version; call
``forget_packed_weights(model)`` after one. Trainable weights stay inputs of the graph (an optimizer step needs
no recompile), which on a CPU pays little. dynamo compiles at most ``torch._dynamo.config.recompile_limit`` (8)
graphs per compiled step (row counts × cache-length buckets × autocast and grad modes); past that it logs one
line and the other shapes decode eagerly, with unpacked weights: the same tokens, slower than the default
engine. Same tokens as the eager engine for one seed wherever the summation order does not flip a draw; where
compiling fails (no C++ compiler...) it warns once and decodes eagerly. Opt-in, because a compile costs about a
minute per shape and precision on a CPU, and each frozen graph keeps its own packed copy of the weights for as
long as the process lives (torch frees no compiled graph, even after ``torch._dynamo.reset()``: +350 MiB for each
compile of a 190 MiB GPT-2, +52 MiB for a 20 MiB one, measured). Measured
(``benchmarks/generation_speed.py``, results/generation_speed-20261201T045558Z.json: SmolLM2-135M, fp32, 2 prompts
× 4 samples × 32 tokens, 2 threads, an Intel Xeon with AMX, idle): a decode step of 41 ms frozen and compiled
against 65 ms for the eager engine's with packed weights; 156 tokens/s, 2.28× ``generate``'s, against 105 (1.50×)
for the eager engine with its packed weights kept; 44 s to compile.

The output is the one ``generate`` gives after the prompt: [B·n, T] token ids, prompt-major (the n samples of
prompt i in rows i·n…i·n+n−1), pad after a sequence's EOS, T ≤ ``max_new_tokens`` the number of steps run.
Anything else (seq2seq models, stateful models such as Mamba, models without static-cache support) falls back
to ``generate`` with the same settings (``generate_sampling``): never a wrong result.

Plugging in another engine (vLLM on a GPU): any callable with the ``RolloutEngine`` signature,
``engine(model, prompt_ids, prompt_mask, n, decoding, generator) -> completion ids``, assigned to
``rlhfkit.models.engine.ENGINE``; the algorithms only see completion ids and recompute every log-prob
with a teacher-forced forward pass, so an engine must sample from the distribution ``decoding`` describes
(its weights synced with ``model`` before each call) and nothing more. Left-padded prompts come in;
``generator`` seeds the draws (None: the global torch generator).
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import transformers
from transformers import GenerationConfig, PreTrainedModel, StaticCache

from rlhfkit.models.decode import DecodeStep, decode_step
from rlhfkit.models.packed import lora_owners, packed_weights, weight_state
from rlhfkit.models.policy import completion_tokens, generate_exactly, is_seq2seq, transformers_model


@dataclass(frozen=True)
class Decoding:
    """How each next token is chosen: softmax(z / temperature), EOS forbidden before ``min_new_tokens``,
    optionally cut to the ``top_k`` tokens (0: all) and the ``top_p`` mass; ``greedy`` takes argmax z."""

    max_new_tokens: int
    eos_token_id: int | None
    pad_token_id: int
    temperature: float = 1.0
    min_new_tokens: int = 0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def generation_config(self, model: PreTrainedModel, n: int) -> GenerationConfig:
        """These settings and nothing else as a GenerationConfig, for ``generate_exactly``."""
        sampling = {} if self.greedy else {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        return GenerationConfig(do_sample=not self.greedy, **sampling, max_new_tokens=self.max_new_tokens,
                                min_new_tokens=self.min_new_tokens or None, num_return_sequences=n,
                                pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
                                bos_token_id=getattr(model.config, "bos_token_id", None),
                                decoder_start_token_id=getattr(model.config, "decoder_start_token_id", None))


class RolloutEngine(Protocol):
    def __call__(self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int,
                 decoding: Decoding, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, P] left-padded prompts and their mask → [B·n, T] completion ids (see the module docstring)."""
        ...


# transformers 5 allocates a StaticCache lazily (batch size, heads and dtype from the first call).
LAZY_STATIC_CACHE = int(transformers.__version__.split(".")[0]) >= 5


def has_static_cache(model: torch.nn.Module) -> bool:
    """Whether ``kv_cached_sampling`` can run ``model``: a causal LM whose transformers class supports a
    static cache (the flag transformers sets for models that compile with one) and keeps no recurrent state,
    not under a peft prompt-learning adapter (its virtual tokens live in peft's forward, which the engine skips)."""
    hf = transformers_model(model)
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    return (LAZY_STATIC_CACHE and isinstance(hf, PreTrainedModel) and not is_seq2seq(hf) and hf.can_generate()
            and getattr(hf, "_can_compile_fullgraph", False) and not getattr(hf, "_is_stateful", False)
            and not prompt_learning)


def next_token_logits(logits: torch.Tensor, step: int, decoding: Decoding) -> torch.Tensor:
    """z / τ for the token at ``step`` (0-based), EOS at −∞ before ``min_new_tokens``, and the tokens outside
    the top-k / top-p set at −∞ (transformers' TopK and TopP warpers: ties with the k-th logit are kept; the
    smallest set whose mass reaches p, at least one token)."""
    z = logits.float()
    if step < decoding.min_new_tokens and decoding.eos_token_id is not None:
        z[:, decoding.eos_token_id] = float("-inf")
    if decoding.greedy:
        return z
    if decoding.temperature != 1.0:
        z = z / decoding.temperature
    if 0 < decoding.top_k < z.shape[-1]:
        kth = torch.topk(z, decoding.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if decoding.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=False)
        outside = sorted_z.softmax(-1).cumsum(-1) <= 1 - decoding.top_p
        outside[:, -1] = False
        z = z.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return z


def draw(z: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: argmax z when ``greedy``, else an exact draw from softmax(z) by inverse CDF,
    y = min{i : F_i > u·F_V}, F = cumsum(p) in float64, u ~ U[0, 1) (tokens at p = 0 are never drawn)."""
    if greedy:
        return z.argmax(-1)
    cdf = z.softmax(-1).cumsum(-1, dtype=torch.float64)
    u = torch.rand(z.shape[0], 1, generator=generator, device=z.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=z.shape[-1] - 1)


# A compiled decode step is one graph per [rows, cache length]: cache lengths are rounded up to a multiple of
# this, so that prompts of any length in a bucket reuse one graph (masked cache slots cost a little attention).
CACHE_LENGTH_BUCKET = 64


def bucketed(cache_length: int) -> int:
    """``cache_length`` rounded up to a multiple of ``CACHE_LENGTH_BUCKET``: the compiled step's cache length."""
    return -(-cache_length // CACHE_LENGTH_BUCKET) * CACHE_LENGTH_BUCKET


class DecodeStepModule(torch.nn.Module):
    """One decode step of ``hf``: its written-out step (``rlhfkit.models.decode``) where there is one, else its
    own forward; a module whose parameters are ``hf``'s, the form in which ``torch.compile`` can freeze them."""

    def __init__(self, hf: PreTrainedModel, written_out: DecodeStep | None, cache_argument: str) -> None:
        super().__init__()
        self.hf, self.written_out, self.cache_argument = hf, written_out, cache_argument

    def forward(self, token: torch.Tensor, position: torch.Tensor, index: torch.Tensor, attend: torch.Tensor,
                mask: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """Next-token logits [R, V] for ``token`` [R, 1] (see ``llama_step``; ``mask``: ``attend`` as [R, L])."""
        if self.written_out is not None:
            return self.written_out(self.hf, token, position, index, attend, cache)
        return self.hf(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True,
                       **{self.cache_argument: cache}).logits[:, -1]


def frozen_state(hf: PreTrainedModel) -> tuple | None:
    """What changes when any weight or buffer of ``hf`` changes (``packed.weight_state`` of each, and which
    tensors they are), or None where one is trainable or cannot be tracked: the weights a frozen graph folds in."""
    owners = lora_owners(hf)
    states = []
    for module in hf.modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            state = weight_state(tensor, owners.get(module))
            if state is None:
                return None
            states.append((id(tensor), state))
    return tuple(states)


def hook_state(hf: PreTrainedModel) -> tuple:
    """Which forward hooks and pre-hooks ``hf``'s modules carry, and torch's global ones (each hook's handle id):
    dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a graph traced
    before a hook was added, or after one was removed, would decode as if it still were not, or were."""
    from torch.nn.modules import module as nn_module

    hooked = tuple((id(module), tuple(module._forward_hooks), tuple(module._forward_pre_hooks))
                   for module in hf.modules() if module._forward_hooks or module._forward_pre_hooks)
    return tuple(nn_module._global_forward_hooks), tuple(nn_module._global_forward_pre_hooks), hooked


@dataclass
class _CompiledStep:
    """A compiled ``DecodeStepModule`` kept on its model, with what it was compiled for: the written-out step
    it runs (None: the model's forward), the ``frozen_state`` its graph folded in (None: the weights are
    inputs of the graph) and the ``hook_state`` it was traced with. Neither copied nor saved with the model (a
    copy compiles its own); dropped by ``forget_packed_weights``."""

    step: Callable | None  # None where compiling failed: decode eagerly
    written_out: DecodeStep | None
    frozen: tuple | None
    hooks: tuple = ()

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return type(None), ()


COMPILED_ATTRIBUTE = "_rlhfkit_compiled_step"


def compiled_step(hf: PreTrainedModel, module: DecodeStepModule) -> Callable:
    """``module`` under ``torch.compile`` (static shapes; a graph per row count and cache length), kept on ``hf``
    for later calls. Where every weight of ``hf`` is frozen, the graph is compiled with inductor's ``freezing``:
    the weights become constants, packed once for the CPU's matrix kernels and folded into the fused step (what
    makes it pay on a CPU); compiled again when any of them changes, or a forward hook is added or removed
    (``hook_state``). Else the weights are graph inputs (an
    optimizer step needs no recompile). Where compiling fails (no C++ compiler, an unsupported model) it warns
    once and returns ``module`` itself."""
    import torch._inductor.config as inductor

    frozen, hooks = frozen_state(hf), hook_state(hf)
    kept = hf.__dict__.get(COMPILED_ATTRIBUTE)
    if kept is None or kept.written_out is not module.written_out or kept.frozen != frozen or kept.hooks != hooks:
        def run(*inputs: torch.Tensor | StaticCache) -> torch.Tensor:
            return module(*inputs)

        # dynamo keeps its graphs on the code object it compiled, and guards a frozen graph on the weights' shapes,
        # not their values: with a code object of its own, no later call can find a graph of stale weights
        own = types.FunctionType(run.__code__.replace(), run.__globals__, run.__name__, None, run.__closure__)
        kept = _CompiledStep(torch.compile(own, dynamic=False), module.written_out, frozen, hooks)
        hf.__dict__[COMPILED_ATTRIBUTE] = kept  # not setattr: a module attribute would become a submodule
    if kept.step is None:
        return module

    def step(*inputs: torch.Tensor | StaticCache) -> torch.Tensor:
        if kept.step is not None:
            try:
                with inductor.patch(freezing=kept.frozen is not None):
                    return kept.step(*inputs)
            except Exception as error:
                # A genuine error of the model (decoding past its positions...) is raised here by the eager step,
                # as the default engine raises it, and the compiled step stays for the model's later calls.
                logits = module(*inputs)
                reason = (str(error).strip().splitlines() or [""])[0][:160]
                warnings.warn(f"rollout engine: torch.compile failed ({type(error).__name__}: {reason}); decoding "
                              "without it", RuntimeWarning, stacklevel=2)
                kept.step = None
                return logits
        return module(*inputs)

    return step


@torch.no_grad()
def kv_cached_sampling(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int,
                       decoding: Decoding, generator: torch.Generator | None = None, *,
                       compiled: bool = False, packed: bool = True) -> torch.Tensor:
    """``n`` completions per left-padded prompt with the prompt's KV computed once (see the module docstring).

    Positions follow the attention mask (position of a token = number of real tokens before it), as in
    ``generate`` and ``completion_logits``, so a padded prompt decodes as it would alone. ``compiled``: the
    decode steps run ``torch.compile``'d (``compiled_kv_cached_sampling``). ``packed`` (eager steps only): the
    model's linear layers multiply by packed weights (``rlhfkit.models.packed``: packed at the call's first
    step, or kept from an earlier call for frozen weights that did not change).
    """
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("kv_cached_sampling takes left-padded prompts (every row's last token real): set the "
                         "tokenizer's padding_side='left' (rlhfkit.models.policy.prepare_tokenizer does)")
    hf = transformers_model(model)
    batch, prompt_length = prompt_ids.shape
    steps = decoding.max_new_tokens
    cache_length = bucketed(prompt_length + steps) if compiled else prompt_length + steps
    mask = torch.cat([prompt_mask.long(), prompt_mask.new_zeros(batch, cache_length - prompt_length,
                                                                 dtype=torch.long)], dim=1)
    position = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    arguments = inspect.signature(hf.forward).parameters
    cache = StaticCache(config=hf.config, max_cache_len=cache_length)
    cache_argument = "cache" if "cache" in arguments else "past_key_values"
    cached = {cache_argument: cache, "use_cache": True}
    keep = {"logits_to_keep": 1} if "logits_to_keep" in arguments else {}
    with packed_weights(hf, batch * n) if packed and not compiled else nullcontext():
        logits = hf(input_ids=prompt_ids, attention_mask=mask, position_ids=position, **cached, **keep).logits[:, -1]
        # Each prompt's KV, read once, shared by its n samples: rows i·n…i·n+n−1 are prompt i's.
        cache.reorder_cache(torch.arange(batch, device=prompt_ids.device).repeat_interleave(n))
        logits, mask = logits.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
        position = position[:, -1:].repeat_interleave(n, dim=0)
        ended = torch.zeros(batch * n, dtype=torch.bool, device=prompt_ids.device)
        module = DecodeStepModule(hf, decode_step(hf, cache_length), cache_argument)
        forward = compiled_step(hf, module) if compiled else module
        attend = mask.bool()[:, None, None]  # [R, 1, 1, L]: the slots each row attends to (the written-out step's)
        tokens = []
        for step in range(steps):
            token = draw(next_token_logits(logits, step, decoding), decoding.greedy, generator)
            token = token.masked_fill(ended, decoding.pad_token_id)
            tokens.append(token)
            if decoding.eos_token_id is not None:
                ended |= token == decoding.eos_token_id
            if step == steps - 1 or bool(ended.all()):
                break
            mask[:, prompt_length + step] = 1
            attend[..., prompt_length + step] = True
            position = position + 1
            index = torch.tensor([prompt_length + step], device=prompt_ids.device)
            logits = forward(token[:, None], position, index, attend, mask, cache)
    return torch.stack(tokens, dim=1)


compiled_kv_cached_sampling: RolloutEngine = partial(kv_cached_sampling, compiled=True)


def generate_sampling(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int,
                      decoding: Decoding, generator: torch.Generator | None = None) -> torch.Tensor:
    """The same completions from ``model.generate`` (seq2seq and other models the engine cannot run).
    ``generate`` draws from the global generator: ``generator`` seeds it for the call, then it is restored."""
    if decoding.greedy:  # generate refuses n greedy copies; give it the prompt n times
        prompt_ids, prompt_mask, n = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0), 1
    encoded = {"input_ids": prompt_ids, "attention_mask": prompt_mask}
    devices = [prompt_ids.device] if prompt_ids.device.type != "cpu" else []
    with torch.random.fork_rng(devices, enabled=generator is not None, device_type=prompt_ids.device.type):
        if generator is not None:
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
        output = generate_exactly(model, encoded, decoding.generation_config(model, n))
    return completion_tokens(transformers_model(model), output, prompt_ids.shape[1])


ENGINE: RolloutEngine = kv_cached_sampling  # replace with another engine (vLLM) to plug it in


def sample_completions(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int,
                       decoding: Decoding, generator: torch.Generator | None = None,
                       compiled: bool = False) -> torch.Tensor:
    """[B·n, T] completion ids for [B, P] prompts: ``ENGINE`` (``compiled``: ``compiled_kv_cached_sampling``) for
    a causal LM with static-cache support, ``generate`` for any other model."""
    engine = (compiled_kv_cached_sampling if compiled else ENGINE) if has_static_cache(model) else generate_sampling
    return engine(model, prompt_ids, prompt_mask, n, decoding, generator)
