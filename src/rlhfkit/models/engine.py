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

``compiled_kv_cached_sampling`` runs the decode steps (not the prefill, whose length varies) through
``torch.compile``: one graph per model class, row count and cache length, the cache length rounded up to a
multiple of 64 so that prompts of different lengths share a graph. Same tokens as the eager engine for one
seed; where compiling fails (no C++ compiler...) it warns once and decodes eagerly. It is opt-in
(``ENGINE = compiled_kv_cached_sampling``) because on a CPU it rarely pays for its compile. Measured with
``benchmarks/generation_speed.py`` on a 2-core EPYC with AVX512-BF16 (1 thread; the machine was loaded, so
ratios of CPU seconds): 9-88 s to compile per shape and precision; then a rollout of the workload's 5.3M
GPT-2 (8 prompts × 4 samples, 32 tokens) runs at 1.63× ``generate``'s tokens/s against the eager engine's
1.39× (fp32; 1.70× and 1.39× with bf16 weights), of SmolLM2-135M (2 × 4) at 1.30× against 1.22× (fp32)
and 0.97× against 1.25× (bf16: the compiled step took 79 ms of CPU against eager's 64, cause not
isolated). The compiled decode step multiplies by unpacked weights (inductor packs them only with its
``freezing`` option, which makes weights constants of the graph: stale after an optimizer step).

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
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import transformers
from transformers import GenerationConfig, PreTrainedModel, StaticCache

from rlhfkit.models.decode import decode_step
from rlhfkit.models.packed import packed_weights
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


# Model class → its forward under torch.compile (static shapes), None where compiling failed in this process.
# Keyed by class, not model: an entry holds no model alive, and dynamo's guards recompile for another model
# or shape; parameters are graph inputs, so weights updated in place need no recompilation.
_COMPILED_FORWARD: dict[type, Callable | None] = {}


def decode_forward(hf: PreTrainedModel, compiled: bool) -> Callable:
    """The forward pass of one decode step: ``hf`` itself, or its compiled forward, which falls back to ``hf``
    with a one-line warning where compilation fails (no C++ compiler, an unsupported backend or model)."""
    if not compiled:
        return hf
    kind = type(hf)
    if kind not in _COMPILED_FORWARD:
        _COMPILED_FORWARD[kind] = torch.compile(kind.forward, dynamic=False)  # compiles lazily, at the first call

    def forward(**inputs):
        if _COMPILED_FORWARD[kind] is not None:
            try:
                return _COMPILED_FORWARD[kind](hf, **inputs)
            except Exception as error:  # a genuine error of the model is raised again below, by hf
                reason = (str(error).strip().splitlines() or [""])[0][:160]
                warnings.warn(f"rollout engine: torch.compile failed ({type(error).__name__}: {reason}); decoding "
                              "without it", RuntimeWarning, stacklevel=2)
                _COMPILED_FORWARD[kind] = None
        return hf(**inputs)

    return forward


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
    cached = {"cache" if "cache" in arguments else "past_key_values": cache, "use_cache": True}
    keep = {"logits_to_keep": 1} if "logits_to_keep" in arguments else {}
    with packed_weights(hf, batch * n) if packed and not compiled else nullcontext():
        logits = hf(input_ids=prompt_ids, attention_mask=mask, position_ids=position, **cached, **keep).logits[:, -1]
        # Each prompt's KV, read once, shared by its n samples: rows i·n…i·n+n−1 are prompt i's.
        cache.reorder_cache(torch.arange(batch, device=prompt_ids.device).repeat_interleave(n))
        logits, mask = logits.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
        position = position[:, -1:].repeat_interleave(n, dim=0)
        ended = torch.zeros(batch * n, dtype=torch.bool, device=prompt_ids.device)
        forward = decode_forward(hf, compiled)
        written_out = None if compiled else decode_step(hf, cache_length)
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
            if written_out is not None:
                logits = written_out(hf, token[:, None], position, prompt_length + step, attend, cache)
            else:
                step_input = {"input_ids": token[:, None], "attention_mask": mask, "position_ids": position}
                logits = forward(**step_input, **cached).logits[:, -1]
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
                       decoding: Decoding, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B·n, T] completion ids for [B, P] prompts: ``ENGINE`` for a causal LM with static-cache support,
    ``generate`` for any other model."""
    engine = ENGINE if has_static_cache(model) else generate_sampling
    return engine(model, prompt_ids, prompt_mask, n, decoding, generator)
