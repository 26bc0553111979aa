"""Loading a policy: any Hugging Face causal or encoder-decoder (seq2seq) language model + tokenizer.

rlhfkit never forks model code; the two families differ only in which Auto class loads them, how a
prompt is fed (left-padded context vs encoder input) and where the completion's tokens sit in the
output of `generate`.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def is_seq2seq(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> PreTrainedTokenizerBase:
    """Make a tokenizer ready for batched generation: a pad token, and left padding for causal models
    (so that every prompt ends right where its completion starts)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not is_seq2seq(model):
        tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_policy(name_or_path: str | os.PathLike, gguf_file: str | None = None,
                dtype: torch.dtype | str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal or seq2seq LM and its tokenizer with ``from_pretrained``.

    ``name_or_path`` is a hub id or a local folder; ``gguf_file`` names a GGUF file inside it (it is
    dequantised to float32 on load, which takes a while: save the result with ``save_pretrained`` once
    and load that folder afterwards).
    """
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    name_or_path = os.path.expanduser(name_or_path)
    if str(name_or_path).startswith(("/", ".")) and not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such model folder (a local path; hub ids look like org/name)")
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model.eval()
    return model, prepare_tokenizer(tokenizer, model)


def completion_tokens(model: PreTrainedModel, output: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The new tokens in the output of ``generate``: after the prompt for a causal model, after the
    decoder start token for a seq2seq one."""
    return output[:, 1:] if is_seq2seq(model) else output[:, prompt_length:]


def transformers_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (its LoRA layers are injected, so calling it applies them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def generate_exactly(model: PreTrainedModel, encoded: Mapping[str, torch.Tensor],
                     config: GenerationConfig) -> torch.Tensor:
    """``model.generate`` with ``config`` and nothing else. transformers fills every field a config
    leaves unset from the model's own ``generation_config`` (no_repeat_ngram_size, suppress_tokens,
    bad_words_ids, min_new_tokens, num_beams, repetition_penalty...), so samples would come from
    another distribution than softmax(logits / τ); the model's config is swapped for an empty one
    for the duration of the call."""
    hf_model = transformers_model(model)
    own = hf_model.generation_config
    hf_model.generation_config = GenerationConfig()
    try:
        return model.generate(**encoded, generation_config=config)
    finally:
        hf_model.generation_config = own


def max_positions(model: PreTrainedModel) -> int | None:
    """How many positions the model can attend over (None: no limit, e.g. T5's relative positions)."""
    return getattr(model.config, "max_position_embeddings", None)


def check_prompt_lengths(model: PreTrainedModel, attention_mask: torch.Tensor, prompts: Sequence[str],
                         max_new_tokens: int) -> None:
    """A prompt must leave room for ``max_new_tokens`` within the model's positions (a causal model
    reads both in one sequence; a seq2seq one reads the prompt in its encoder), else a ValueError that
    names the prompt instead of an IndexError inside the model."""
    limit = max_positions(model)
    if limit is None:
        return
    seq2seq = is_seq2seq(model)
    budget = limit if seq2seq else limit - max_new_tokens
    if max_new_tokens > limit or budget < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} does not fit the model's {limit} positions")
    lengths = attention_mask.sum(dim=1).tolist()
    for prompt, length in zip(prompts, lengths, strict=True):
        if length > budget:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            room = "" if seq2seq else f" with max_new_tokens {max_new_tokens}"
            raise ValueError(f"prompt {shown!r} has {length} tokens; the model's {limit} positions leave room for "
                             f"{budget}{room}: shorten it or lower max_new_tokens")


def save_dequantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """Save a model loaded from GGUF (already dequantised to float32 by transformers) as a plain
    safetensors folder, which reloads in about a second instead of dequantising again."""
    model.hf_quantizer = None  # the weights are plain tensors now; only the marker blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


# ---------------------------------------------------------------- log-probs of completions


@dataclass
class TokenBatch:
    """Prompts (left-padded for causal models) and their completions (right-padded; the mask is 1 up
    to and including the first EOS)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.prompt_ids, self.prompt_mask, self.completion_ids, self.completion_mask

    def __getitem__(self, index) -> TokenBatch:
        return TokenBatch(*(t[index] for t in self.tensors()))

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in self.tensors()))

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def padded_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one [B, width] tensor and its 0/1 mask, padded on the left or the right."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def tokenize_completions(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str],
                         add_special_tokens: bool, max_prompt_tokens: int, max_completion_tokens: int,
                         model: PreTrainedModel | None = None, truncated: Sequence[bool] | None = None) -> TokenBatch:
    """Formatted prompts (padded on the tokenizer's side) and completions (right-padded) as a TokenBatch.

    A completion ends with EOS when it is whole; one cut at ``max_completion_tokens``, or marked in
    ``truncated`` (cut at generation's ``max_new_tokens``: the start of an answer), keeps no EOS (the
    model must not learn to stop at the cut). ``truncated=None``: every completion is taken as whole. A
    prompt keeps its last ``max_prompt_tokens`` tokens, and fewer when ``model``'s positions require it (a
    causal model reads prompt and completion in one sequence): then a warning says how many prompts were cut.
    """
    limit = max_positions(model) if model is not None else None
    causal = model is None or not is_seq2seq(model)
    if limit is not None:
        max_completion_tokens = min(max_completion_tokens, limit - 1 if causal else limit)
    cut_at_generation = [False] * len(completions) if truncated is None else list(truncated)
    completion_rows = []
    for ids, stopped in zip(tokenizer(list(completions), add_special_tokens=False)["input_ids"], cut_at_generation,
                        strict=True):
        whole = len(ids) < max_completion_tokens and not stopped
        completion_rows.append([*ids, tokenizer.eos_token_id] if whole else ids[:max_completion_tokens])
    prompt_rows, cut = [], 0
    for ids, completion in zip(tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"],
                               completion_rows, strict=True):
        budget = max_prompt_tokens
        if limit is not None:
            room = limit - len(completion) if causal else limit
            cut += len(ids) > room and room < budget
            budget = min(budget, room)
        prompt_rows.append(ids[max(len(ids) - budget, 0):])
    if cut:
        warnings.warn(f"{cut} of {len(prompts)} prompts cut from the left to fit the model's {limit} positions",
                      stacklevel=2)
    prompt_ids, prompt_mask = padded_rows(prompt_rows, tokenizer.pad_token_id, tokenizer.padding_side == "left")
    completion_ids, completion_mask = padded_rows(completion_rows, tokenizer.pad_token_id, left=False)
    return TokenBatch(prompt_ids, prompt_mask, completion_ids, completion_mask)


def completion_logits(model: PreTrainedModel, batch: TokenBatch,
                      output_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits predicting each completion token, [B, T, V] (and the last hidden state there, [B, T, H]).

    The one place where causal and encoder-decoder models differ:
    * causal: prompt and completion are one sequence; the logits at position t−1 predict token t.
      Position ids follow the attention mask, as in ``generate``, so left padding changes nothing.
      The LM head reads only those positions where the model takes transformers' ``logits_to_keep``:
      at SmolLM2's shapes (8 rows, 45 prompt + 32 completion tokens, LoRA, bf16 autocast) the head over
      the prompt's positions was 10-19% of a forward + backward, and its logits 57 MiB.
    * seq2seq: the prompt is the encoder input; the decoder reads [start] + completion[:-1].
    """
    if is_seq2seq(model):
        start = torch.full_like(batch.completion_ids[:, :1], model.config.decoder_start_token_id)
        decoder_input = torch.cat([start, batch.completion_ids[:, :-1]], dim=1)
        out = model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask, decoder_input_ids=decoder_input,
                    output_hidden_states=output_hidden)
        return out.logits, (out.decoder_hidden_states[-1] if output_hidden else None)
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    start = batch.prompt_ids.shape[1] - 1
    kept = input_ids.shape[1] - start  # the last prompt position on
    keep = {"logits_to_keep": kept} if start >= 0 and takes_logits_to_keep(model) else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=output_hidden, **keep)
    hidden = out.hidden_states[-1][:, start:-1] if output_hidden else None
    return (out.logits[:, -kept:-1] if keep else out.logits[:, start:-1]), hidden


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the transformers model under its peft wrapper) computes its LM head on the last
    ``logits_to_keep`` positions only. A wrapper that hides the signature (FSDP) gets every position's logits."""
    return "logits_to_keep" in inspect.signature(transformers_model(model).forward).parameters


@dataclass(frozen=True)
class SamplingDistribution:
    """The distribution rollouts sample from, which their log-probs must be computed under:
    softmax(logits / temperature), with EOS forbidden for the first ``min_new_tokens`` tokens."""

    temperature: float = 1.0
    min_new_tokens: int = 0
    eos_token_id: int | None = None


PLAIN_SAMPLING = SamplingDistribution()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, sampling: SamplingDistribution = PLAIN_SAMPLING,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t) under ``sampling``'s distribution, and optionally that distribution's entropy."""
    logits = logits.float() / sampling.temperature
    if sampling.min_new_tokens and sampling.eos_token_id is not None:
        logits[:, : sampling.min_new_tokens, sampling.eos_token_id] = float("-inf")
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all.nan_to_num(neginf=0.0)).sum(-1) if with_entropy else None
    return logprobs, entropy


def cast_trainable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The weights the optimiser updates in ``dtype``; frozen ones (a LoRA base) stay as loaded."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
