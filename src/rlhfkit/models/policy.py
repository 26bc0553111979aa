"""Loading a policy: any Hugging Face causal or encoder-decoder (seq2seq) language model + tokenizer.

rlhfkit never forks model code; the two families differ only in which Auto class loads them, how a
prompt is fed (left-padded context vs encoder input) and where the completion's tokens sit in the
output of `generate`.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
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
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model.eval()
    return model, prepare_tokenizer(tokenizer, model)


def save_dequantized(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """Save a model loaded from GGUF (already dequantised to float32 by transformers) as a plain
    safetensors folder, which reloads in about a second instead of dequantising again."""
    model.hf_quantizer = None  # the weights are plain tensors now; only the marker blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
