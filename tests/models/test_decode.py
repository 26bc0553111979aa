"""The written-out decode step computes the model's own forward: the engine draws from the same distributions
with it as without it, for every family it covers, with LoRA adapters and under bf16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from rlhfkit.models import engine as engine_module
from rlhfkit.models.decode import decode_step, gpt2_step, llama_step
from rlhfkit.models.engine import Decoding, generate_sampling, kv_cached_sampling

EOS, PAD, VOCAB = 3, 0, 97
LLAMA_SHAPE = {"vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 128,
               "eos_token_id": EOS, "pad_token_id": PAD, "bos_token_id": 1}


def build(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # peaked logits: a near-uniform random model would hide a wrong position or head
        model.get_output_embeddings().weight.mul_(20.0)
    return model


FAMILIES = {
    "llama": lambda: build(LlamaConfig(**LLAMA_SHAPE, rope_theta=10000.0)),
    "qwen2": lambda: build(Qwen2Config(**LLAMA_SHAPE)),  # q, k, v with biases
    "mistral": lambda: build(MistralConfig(**LLAMA_SHAPE, sliding_window=None)),
    "gpt2": lambda: build(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=128,
                                     eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)),
}


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of 7, 3 and 5 tokens."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (3, 7), generator=generator)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :4], mask[2, :2] = 0, 0
    return ids.masked_fill(mask == 0, PAD), mask


def drawn_distributions(model, monkeypatch, written_out: bool, settings: Decoding, batch=None,
                        n: int = 2) -> tuple[torch.Tensor, list]:
    """(the completions, log softmax of every distribution the engine drew from), with or without the
    written-out step, for ``batch`` (ids, mask; default ``prompts()``) and ``n`` samples per prompt."""
    seen = []
    real_draw = engine_module.draw
    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "draw", lambda z, greedy, generator: seen.append(z.log_softmax(-1))
                      or real_draw(z, greedy, generator))
        if not written_out:
            patch.setattr(engine_module, "decode_step", lambda model, cache_length: None)
        completions = kv_cached_sampling(model, *(batch or prompts()), n, settings, torch.Generator().manual_seed(0))
    return completions, seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_written_out_step_draws_from_the_models_own_forward(family, dtype, monkeypatch):
    model = FAMILIES[family]().to(dtype)
    assert decode_step(model, 64) is {"gpt2": gpt2_step}.get(family, llama_step)
    settings = Decoding(12, EOS, PAD, temperature=0.8)
    ours, ours_seen = drawn_distributions(model, monkeypatch, True, settings)
    theirs, theirs_seen = drawn_distributions(model, monkeypatch, False, settings)
    assert torch.equal(ours, theirs)
    assert len(ours_seen) == len(theirs_seen) == ours.shape[1] > 5
    assert torch.equal(torch.stack(ours_seen), torch.stack(theirs_seen))  # every distribution, bit for bit


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_decoding_with_the_written_out_step_is_generates_token_for_token(family):
    model = FAMILIES[family]()
    settings = Decoding(10, EOS, PAD, greedy=True, min_new_tokens=2)
    ids, mask = prompts()
    assert torch.equal(kv_cached_sampling(model, ids, mask, 2, settings),
                       generate_sampling(model, ids, mask, 2, settings))


def test_lora_adapters_apply_in_the_written_out_step(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(FAMILIES["llama"](), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    settings = Decoding(10, EOS, PAD, temperature=0.8)
    ours, ours_seen = drawn_distributions(model, monkeypatch, True, settings)
    theirs, theirs_seen = drawn_distributions(model, monkeypatch, False, settings)
    with model.disable_adapter():
        base, _ = drawn_distributions(model, monkeypatch, True, settings)
    assert torch.equal(ours, theirs) and not torch.equal(ours, base)
    assert torch.equal(torch.stack(ours_seen), torch.stack(theirs_seen))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_added_by_the_trainers_keeps_the_written_out_step(family):
    """The trainers put the policy in eval mode, then add LoRA, whose new layers are in training mode."""
    from rlhfkit.models.reference import add_lora

    model = add_lora(FAMILIES[family]().eval())
    assert decode_step(model.get_base_model(), 64) is {"gpt2": gpt2_step}.get(family, llama_step)


def test_models_the_step_does_not_cover_decode_with_their_own_forward():
    llama = FAMILIES["llama"]()
    assert decode_step(llama.train(), 64) is None  # dropout in training mode
    mistral = build(MistralConfig(**LLAMA_SHAPE, sliding_window=32))
    assert decode_step(mistral, 32) is llama_step and decode_step(mistral, 33) is None
    qwen = build(Qwen2Config(**LLAMA_SHAPE, use_sliding_window=True, sliding_window=16, max_window_layers=1))
    assert decode_step(qwen, 64) is None
    gpt2 = build(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=1, n_head=4, add_cross_attention=True))
    assert decode_step(gpt2, 64) is None
    other = build(LlamaConfig(**LLAMA_SHAPE))
    other.config._attn_implementation = "flash_attention_2"
    assert decode_step(other, 64) is None
    llama.eval().model.layers[0].self_attn.train()  # one module left in training mode
    assert decode_step(llama, 64) is None
    gpt2 = FAMILIES["gpt2"]()
    gpt2.transformer.h[1].attn.resid_dropout.train()  # a dropout the step does not call
    assert decode_step(gpt2, 64) is None


def assert_same_draws(model, monkeypatch, settings: Decoding | None = None, **batch) -> None:
    """The engine draws the same tokens from the same distributions, bit for bit, with the written-out step as
    without it."""
    settings = settings or Decoding(12, EOS, PAD, temperature=0.8)
    ours, ours_seen = drawn_distributions(model, monkeypatch, True, settings, **batch)
    theirs, theirs_seen = drawn_distributions(model, monkeypatch, False, settings, **batch)
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.stack(ours_seen), torch.stack(theirs_seen))


CONFIG_VARIANTS = {
    "SmolLM2's width (576), where the order of a norm's sum shows": lambda: LlamaConfig(**{
        **LLAMA_SHAPE, "hidden_size": 576, "intermediate_size": 64, "num_attention_heads": 9,
        "num_key_value_heads": 3, "num_hidden_layers": 1}),
    "head_dim other than hidden / heads": lambda: LlamaConfig(**LLAMA_SHAPE, head_dim=16),
    "attention and MLP biases": lambda: LlamaConfig(**LLAMA_SHAPE, attention_bias=True, mlp_bias=True),
    "multi-head (as many KV heads as heads)": lambda: LlamaConfig(**{**LLAMA_SHAPE, "num_key_value_heads": 6}),
    "multi-query (one KV head), GELU": lambda: LlamaConfig(**{**LLAMA_SHAPE, "num_key_value_heads": 1},
                                                           hidden_act="gelu"),
    "llama3 rope scaling, tied embeddings": lambda: LlamaConfig(**LLAMA_SHAPE, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "dynamic rope past its original length": lambda: LlamaConfig(**{**LLAMA_SHAPE, "max_position_embeddings": 8},
                                                                 rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "yarn rope": lambda: LlamaConfig(**LLAMA_SHAPE, rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                                                  "original_max_position_embeddings": 16}),
    "mistral with a window longer than the cache": lambda: MistralConfig(**LLAMA_SHAPE, sliding_window=100),
    "qwen2 with a sliding layer, its window longer than the cache": lambda: Qwen2Config(
        **LLAMA_SHAPE, use_sliding_window=True, sliding_window=100, max_window_layers=1),
    "gpt2 scaled by inverse layer index, ReLU, reorder_and_upcast_attn (eager only)": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, scale_attn_by_inverse_layer_idx=True,
        activation_function="relu", reorder_and_upcast_attn=True, eos_token_id=EOS, pad_token_id=PAD,
        bos_token_id=1),
    "gpt2 without 1/√d scaling": lambda: GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4,
                                                    scale_attn_weights=False, eos_token_id=EOS, pad_token_id=PAD,
                                                    bos_token_id=1),
}


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_config_variants_draw_from_the_models_own_forward(variant, dtype, monkeypatch):
    model = build(CONFIG_VARIANTS[variant]()).to(dtype)
    assert decode_step(model, 64) is not None
    assert_same_draws(model, monkeypatch)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_weights_under_bf16_autocast_draw_from_the_models_own_forward(family, monkeypatch):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the RL trainers sample
        assert_same_draws(FAMILIES[family](), monkeypatch)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_eager_attention_in_bf16_draws_from_the_models_own_forward(family, monkeypatch):
    """Eager attention rounds its scores and softmax in bf16 where sdpa does not: the step must not stand in."""
    model = FAMILIES[family]().to(torch.bfloat16)
    model.config._attn_implementation = "eager"
    assert_same_draws(model, monkeypatch)


def test_a_subclass_with_its_own_forward_decodes_with_it(monkeypatch):
    from transformers import LlamaForCausalLM

    class Halved(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits / 2
            return output

    model = FAMILIES["llama"]()
    model.__class__ = Halved
    assert_same_draws(model, monkeypatch)


@pytest.mark.parametrize("where", ["a decoder layer", "the final norm", "an attention"])
def test_forward_hooks_on_the_models_modules_apply(where, monkeypatch):
    """A steering hook (adds a vector to a layer's output) changes the distribution: the engine draws from it."""
    model = FAMILIES["llama"]()
    module = {"a decoder layer": model.model.layers[1], "the final norm": model.model.norm,
              "an attention": model.model.layers[0].self_attn}[where]
    steer = torch.randn(48, generator=torch.Generator().manual_seed(2))
    module.register_forward_hook(lambda _, inputs, output: (output[0] + steer, *output[1:])
                                 if isinstance(output, tuple) else output + steer)
    assert_same_draws(model, monkeypatch)


def test_a_forward_replaced_on_one_module_applies(monkeypatch):
    model = FAMILIES["llama"]()
    norm = model.model.layers[0].post_attention_layernorm
    norm.forward = lambda hidden: type(norm).forward(norm, hidden) * 3  # a patched kernel, a quick experiment
    assert_same_draws(model, monkeypatch)


def test_a_llama_whose_config_counts_fewer_layers_decodes_with_those(monkeypatch):
    """transformers' Llama runs its first ``num_hidden_layers`` layers (a model cut down by its config)."""
    model = FAMILIES["llama"]()
    model.config.num_hidden_layers = 1
    assert_same_draws(model, monkeypatch)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_model_offloaded_by_accelerate_decodes(family, monkeypatch):
    from accelerate import cpu_offload

    model = FAMILIES[family]()
    cpu_offload(model, execution_device=torch.device("cpu"))  # weights on "meta" until a module's hook runs
    assert_same_draws(model, monkeypatch)


def test_lora_modules_to_save_and_a_second_active_adapter_apply(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(FAMILIES["llama"](), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                           modules_to_save=["lm_head", "input_layernorm"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter))
    model.eval()
    assert_same_draws(model, monkeypatch)
    with model.disable_adapter():
        assert_same_draws(model, monkeypatch)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    model.set_adapter("second")
    model.eval()
    assert_same_draws(model, monkeypatch)


def test_a_llama_config_carrying_a_sliding_window_decodes(monkeypatch):
    """Llama ignores ``sliding_window``, but StaticCache sizes every layer by it: the step must not write past it."""
    assert_same_draws(build(LlamaConfig(**LLAMA_SHAPE, sliding_window=4)), monkeypatch)


def long_and_short_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Six left-padded prompts of 40, 33, 26, 19, 12 and 5 tokens."""
    ids = torch.randint(4, VOCAB, (6, 40), generator=torch.Generator().manual_seed(5))
    mask = (torch.arange(40) >= 7 * torch.arange(6)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


RUNS = {
    "one prompt, one sample": lambda: ({"batch": (prompts()[0][:1], prompts()[1][:1]), "n": 1}, None),
    "prompts of very different lengths": lambda: ({"batch": long_and_short_prompts(), "n": 3}, None),
    "the cache at max_position_embeddings": lambda: (
        {"batch": (long_and_short_prompts()[0].repeat(1, 3)[:, :116], torch.ones(6, 116, dtype=torch.long))}, None),
    "top-k, top-p and min_new_tokens": lambda: ({}, Decoding(12, EOS, PAD, temperature=0.8, top_k=5, top_p=0.9,
                                                             min_new_tokens=4)),
    "greedy": lambda: ({}, Decoding(12, EOS, PAD, greedy=True)),
}


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rollout_shapes_and_settings_draw_from_the_models_own_forward(run, family, monkeypatch):
    batch, settings = RUNS[run]()
    assert_same_draws(FAMILIES[family](), monkeypatch, settings=settings, **batch)
