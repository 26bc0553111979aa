"""Training kernels: eager attention only where it is faster (bf16 on a CPU, short sequences), the GELU in one
kernel (the exact one under bf16 on a CPU); the model computes the same function inside (to bf16's rounding),
and leaves with its own modules."""

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation

from rlhfkit.models.kernels import (
    EAGER_ATTENTION_MAX_TOKENS,
    TANH_GELU_MAX_ERROR,
    faster_attention,
    faster_gelu,
    training_kernels,
)
from rlhfkit.precision import Precision

BF16_CPU = Precision(torch.bfloat16, "cpu", "test")
FP32_CPU = Precision(None, "cpu", "test")
BF16_CUDA = Precision(torch.bfloat16, "cuda", "test")


def tiny_gpt2_classifier() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_layer=2, n_head=2, n_embd=32, n_positions=64, num_labels=1, pad_token_id=0,
                        activation_function="gelu_new")
    return GPT2ForSequenceClassification(config).eval()


@pytest.mark.parametrize(("precision", "tokens", "expected"), [
    (BF16_CPU, 49, "eager"), (BF16_CPU, EAGER_ATTENTION_MAX_TOKENS, "eager"),
    (BF16_CPU, EAGER_ATTENTION_MAX_TOKENS + 1, None), (FP32_CPU, 49, None), (BF16_CUDA, 49, None)])
def test_eager_attention_only_under_bf16_on_a_cpu_for_short_sequences(precision, tokens, expected):
    assert faster_attention(precision, tokens) == expected


@pytest.mark.parametrize(("precision", "gelu"), [(BF16_CPU, GELUActivation), (FP32_CPU, GELUTanh),
                                                (BF16_CUDA, GELUTanh)])
def test_the_exact_gelu_only_under_bf16_on_a_cpu(precision, gelu):
    assert faster_gelu(precision) is gelu


def test_the_exact_gelu_is_within_bf16_rounding_of_the_tanh_gelu():
    x = torch.linspace(-12, 12, 2_400_001)
    tanh_gelu = torch.nn.functional.gelu(x, approximate="tanh")
    error = (torch.nn.functional.gelu(x) - tanh_gelu).abs()
    assert TANH_GELU_MAX_ERROR - 1e-6 <= error.max().item() <= TANH_GELU_MAX_ERROR
    large = tanh_gelu.abs() >= 1 / 8  # bf16 keeps 8 significant bits: it rounds y by up to 2^(⌊log2 |y|⌋ − 8)
    half_ulp = torch.exp2(torch.floor(torch.log2(tanh_gelu[large].abs())) - 8)
    assert (error[large] <= half_ulp).all()


def test_inside_the_model_attends_eagerly_with_a_one_kernel_gelu_and_computes_the_same_function():
    model = tiny_gpt2_classifier()
    own_acts = [block.mlp.act for block in model.transformer.h]
    ids = torch.randint(1, 50, (3, 20))
    before = model(input_ids=ids).logits
    with training_kernels(model, BF16_CPU, 20):
        assert model.config._attn_implementation == "eager"
        assert all(type(block.mlp.act) is GELUActivation for block in model.transformer.h)
        inside_bf16 = model(input_ids=ids).logits  # fp32 here: the exact GELU instead of the tanh one
    with training_kernels(model, FP32_CPU, 20):
        assert all(type(block.mlp.act) is GELUTanh for block in model.transformer.h)
        inside_fp32 = model(input_ids=ids).logits
    assert torch.allclose(inside_fp32, before, atol=1e-5)
    assert torch.allclose(inside_bf16, before, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"
    assert [block.mlp.act for block in model.transformer.h] == own_acts
    assert all(type(act) is NewGELUActivation for act in own_acts)


def test_long_sequences_keep_sdpa_and_an_error_inside_still_restores_the_model():
    model = tiny_gpt2_classifier()
    with training_kernels(model, BF16_CPU, EAGER_ATTENTION_MAX_TOKENS + 1):
        assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), training_kernels(model, BF16_CPU, 20):
        raise RuntimeError("training failed")
    assert model.config._attn_implementation == "sdpa"
    assert all(type(block.mlp.act) is NewGELUActivation for block in model.transformer.h)
