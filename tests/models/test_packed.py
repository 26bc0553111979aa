"""Packed weights change how the rollout engine multiplies, never what it samples."""

from __future__ import annotations

import gc

import pytest
import torch
from test_engine import EOS, PAD, PROMPTS, encode, peaked

from rlhfkit.models import engine as engine_module
from rlhfkit.models import packed as packed_module
from rlhfkit.models.engine import Decoding, kv_cached_sampling
from rlhfkit.models.packed import (
    forget_packed_weights,
    keep_packed_weights,
    kept_packed_mib,
    packable_layers,
    packed_weights,
)


def counted(monkeypatch, op: str) -> list[int]:
    """A list that grows by one at every call of ``torch.ops.mkldnn.<op>`` (so a test can tell which path ran)."""
    calls = []
    real = getattr(torch.ops.mkldnn, op)
    monkeypatch.setattr(torch.ops.mkldnn, op, lambda *args: calls.append(1) or real(*args))
    return calls


@pytest.fixture
def packed_products(monkeypatch):
    """Counts the packed matrix products run."""
    return counted(monkeypatch, "_linear_pointwise")


@pytest.fixture
def packings(monkeypatch):
    """Counts the weights packed (reordered into oneDNN's layout)."""
    return counted(monkeypatch, "_reorder_linear_weight")


def rollout(model, ids, mask, settings, packed, monkeypatch):
    """Tokens and the log-probs of every distribution drawn from, seed 0."""
    seen, real_draw = [], engine_module.draw
    monkeypatch.setattr(engine_module, "draw", lambda z, greedy, generator: seen.append(z.log_softmax(-1))
                        or real_draw(z, greedy, generator))
    tokens = kv_cached_sampling(model, ids, mask, 4, settings, torch.Generator().manual_seed(0), packed=packed)
    monkeypatch.setattr(engine_module, "draw", real_draw)
    return tokens, torch.stack(seen, dim=1)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("greedy", [False, True])
def test_the_packed_engine_draws_the_plain_engines_tokens_from_the_same_distributions(
        tiny_causal, tokenizer, monkeypatch, packed_products, dtype, tolerance, greedy):
    model = peaked(tiny_causal).to(dtype)
    ids, mask = encode(tokenizer, PROMPTS)
    settings = Decoding(10, EOS, PAD, temperature=0.8, min_new_tokens=2, greedy=greedy)
    plain_tokens, plain_logprobs = rollout(model, ids, mask, settings, False, monkeypatch)
    assert not packed_products
    packed_tokens, packed_logprobs = rollout(model, ids, mask, settings, True, monkeypatch)
    assert packed_products  # the packed path ran
    assert torch.equal(packed_tokens, plain_tokens)
    live = packed_logprobs.isfinite()
    assert torch.equal(live, plain_logprobs.isfinite())
    torch.testing.assert_close(packed_logprobs[live], plain_logprobs[live], atol=tolerance, rtol=0)


def test_under_a_bf16_autocast_packed_products_compute_what_autocast_computes(tiny_causal, tokenizer,
                                                                              packed_products):
    """fp32 weights under the trainers' bf16 autocast: the packed layers multiply in bf16, as autocast's
    linear does, and give its logits."""
    ids, mask = encode(tokenizer, PROMPTS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = tiny_causal(input_ids=ids, attention_mask=mask).logits
        with packed_weights(tiny_causal, ids.shape[0]):
            packed = tiny_causal(input_ids=ids, attention_mask=mask).logits
    assert packed_products and packed.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(packed.float(), plain.float(), atol=2e-2, rtol=2e-2)


def test_a_rollout_after_an_optimizer_step_samples_from_the_new_weights(tiny_causal, tokenizer, packed_products):
    model = peaked(tiny_causal)
    ids, mask = encode(tokenizer, PROMPTS)
    settings = Decoding(8, EOS, PAD, greedy=True)
    before = kv_cached_sampling(model, ids, mask, 1, settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    model(input_ids=ids, attention_mask=mask).logits[:, -1].gather(1, before[:, :1]).sum().backward()
    optimizer.step()  # in place: the first greedy tokens lose their logit
    after = kv_cached_sampling(model, ids, mask, 1, settings)
    assert packed_products
    assert not torch.equal(after, before)
    assert torch.equal(after, kv_cached_sampling(model, ids, mask, 1, settings, packed=False))


def test_lora_layers_keep_their_adapter_with_packed_base_weights(tiny_causal, tokenizer, packed_products):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(peaked(tiny_causal), LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                           fan_in_fan_out=True, init_lora_weights=False))
    ids, mask = encode(tokenizer, PROMPTS)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with packed_weights(model, ids.shape[0]):
            packed = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
    assert packed_products
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)
    assert (plain - base).abs().max() > 0.1  # the adapter matters, and the packed path kept it


def test_where_packing_cannot_run_it_warns_once_and_multiplies_plainly(tiny_causal, tokenizer, packed_products,
                                                                       monkeypatch):
    monkeypatch.setattr(packed_module, "_WARNED", set())
    model = tiny_causal.to(torch.float16)
    ids, mask = encode(tokenizer, PROMPTS)
    settings = Decoding(6, EOS, PAD, greedy=True)
    with pytest.warns(RuntimeWarning, match=r"packed weights off \(weights in torch.float16") as caught:
        packed = kv_cached_sampling(model, ids, mask, 2, settings)
    assert len([w for w in caught if "packed weights off" in str(w.message)]) == 1
    assert not packed_products
    assert torch.equal(packed, kv_cached_sampling(model, ids, mask, 2, settings, packed=False))


def test_the_layers_are_plain_again_after_the_context_even_after_an_error(tiny_causal):
    layers = [m for m in tiny_causal.modules() if "forward" in vars(m)]
    with pytest.raises(KeyError), packed_weights(tiny_causal, 2):
        assert vars(tiny_causal.lm_head).get("forward") is not None
        raise KeyError("inside")
    assert [m for m in tiny_causal.modules() if "forward" in vars(m)] == layers


@torch.no_grad()
def logits(model, ids, mask, packed: bool) -> torch.Tensor:
    if not packed:
        return model(input_ids=ids, attention_mask=mask).logits
    with packed_weights(model, ids.shape[0]):
        return model(input_ids=ids, attention_mask=mask).logits


def test_frozen_weights_are_packed_once_and_reused_while_unchanged(tiny_causal, tokenizer, packings):
    model = peaked(tiny_causal).requires_grad_(False)
    ids, mask = encode(tokenizer, PROMPTS)
    settings = Decoding(6, EOS, PAD, greedy=True)
    first = kv_cached_sampling(model, ids, mask, 2, settings)
    assert len(packings) == len(packable_layers(model))
    assert torch.equal(kv_cached_sampling(model, ids, mask, 2, settings), first)
    assert len(packings) == len(packable_layers(model))  # the second call packed nothing
    assert torch.equal(first, kv_cached_sampling(model, ids, mask, 2, settings, packed=False))
    assert kept_packed_mib(model) > 0
    kv_cached_sampling(model, ids[:1], mask[:1], 1, settings)  # one row: oneDNN's layout for one row differs
    assert len(packings) == 2 * len(packable_layers(model))


def test_trainable_weights_are_packed_at_every_call_and_not_kept(tiny_causal, tokenizer, packings):
    ids, mask = encode(tokenizer, PROMPTS)
    for _ in range(2):
        kv_cached_sampling(tiny_causal, ids, mask, 2, Decoding(4, EOS, PAD, greedy=True))
    assert len(packings) == 2 * len(packable_layers(tiny_causal))
    assert kept_packed_mib(tiny_causal) == 0


def optimizer_step(model):  # a phase of training between two rollouts of a model that is frozen again after it
    model.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    optimizer.step()
    model.requires_grad_(False)


def load_state_dict(model):
    model.load_state_dict({k: v + torch.randn_like(v) for k, v in model.state_dict().items()})


def in_place_copy(model):
    with torch.no_grad():
        for layer in packable_layers(model):
            layer.weight.copy_(torch.randn_like(layer.weight))


def assign_data(model):
    for layer in packable_layers(model):
        layer.weight.data = torch.randn_like(layer.weight)


def dtype_round_trip(model):  # new storage each time, weights rounded to bf16
    model.to(torch.bfloat16).to(torch.float32)


@pytest.mark.parametrize("change", [optimizer_step, load_state_dict, in_place_copy, assign_data, dtype_round_trip])
def test_a_kept_packed_weight_is_never_used_after_its_weight_changed(tiny_causal, tokenizer, packings, change):
    model = peaked(tiny_causal).requires_grad_(False)
    ids, mask = encode(tokenizer, PROMPTS)
    before = logits(model, ids, mask, packed=True)
    change(model)
    plain_after = logits(model, ids, mask, packed=False)
    assert (plain_after - before).abs().max() > 1e-3  # the change is visible in the logits
    torch.testing.assert_close(logits(model, ids, mask, packed=True), plain_after, atol=1e-5, rtol=1e-5)
    assert len(packings) == 2 * len(packable_layers(model))


def test_lora_merges_and_adapter_switches_are_seen_by_the_kept_base_weights(tiny_causal, tokenizer, packings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(peaked(tiny_causal), config)
    model.add_adapter("other", config)
    ids, mask = encode(tokenizer, PROMPTS)
    with model.disable_adapter():
        base = logits(model, ids, mask, packed=False)
    logits(model, ids, mask, packed=True)  # the base weights packed and kept, unmerged
    # A stale base weight would show: merged, the layer no longer adds the adapter (base logits);
    # unmerged after a merged rollout, it would add it twice; another adapter changes the merged delta.
    for change in (model.merge_adapter, model.unmerge_adapter, lambda: model.set_adapter("other"),
                   model.merge_adapter):
        change()
        plain = logits(model, ids, mask, packed=False)
        assert (plain - base).abs().max() > 0.1  # the adapter matters
        torch.testing.assert_close(logits(model, ids, mask, packed=True), plain, atol=1e-4, rtol=1e-4)
    base_layers = [m.base_layer for m in model.modules() if hasattr(m, "merged_adapters")]
    assert base_layers and all(not layer.weight.requires_grad for layer in base_layers)
    assert kept_packed_mib(model) > 0  # the base weights were kept in between


def test_kept_packed_weights_are_freed_with_the_model_or_when_forgotten(tokenizer, packings):
    from conftest import build_tiny_causal

    ids, mask = encode(tokenizer, PROMPTS)
    gc.collect()  # an earlier test's model with a compiled step (a reference cycle) is freed now, not mid-test
    kept_before = len(packed_module._KEPT)
    model = build_tiny_causal().requires_grad_(False)
    logits(model, ids, mask, packed=True)
    assert len(packed_module._KEPT) == kept_before + len(packable_layers(model))
    forget_packed_weights(model)
    assert len(packed_module._KEPT) == kept_before
    logits(model, ids, mask, packed=True)
    assert len(packings) == 2 * len(packable_layers(model))  # packed again after forgetting
    del model
    gc.collect()
    assert len(packed_module._KEPT) == kept_before


def test_inside_keep_packed_weights_a_trainable_model_is_packed_once_and_is_trainable_again_after(
        tiny_causal, tokenizer, packings):
    model = peaked(tiny_causal)
    model.transformer.h[0].mlp.c_fc.requires_grad_(False)  # frozen before: stays frozen, and its copy kept
    ids, mask = encode(tokenizer, PROMPTS)
    settings = Decoding(4, EOS, PAD, greedy=True)
    with keep_packed_weights(model):
        first = kv_cached_sampling(model, ids, mask, 2, settings)
        assert torch.equal(kv_cached_sampling(model, ids, mask, 2, settings), first)
    assert len(packings) == len(packable_layers(model))
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias"]
    assert [layer for layer in packable_layers(model) if packed_module._KEPT.get(layer)] == [
        model.transformer.h[0].mlp.c_fc]


def test_with_lora_a_rollout_after_an_adapter_step_repacks_only_the_adapters_and_samples_from_them(
        tiny_causal, tokenizer, packings):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(peaked(tiny_causal), LoraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                           fan_in_fan_out=True, init_lora_weights=False))
    ids, mask = encode(tokenizer, PROMPTS)
    settings = Decoding(8, EOS, PAD, greedy=True)
    before = kv_cached_sampling(model, ids, mask, 1, settings)
    layers = packable_layers(model)
    adapters = [layer for layer in layers if layer.weight.requires_grad]
    assert len(packings) == len(layers) and 0 < len(adapters) < len(layers)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    model(input_ids=ids, attention_mask=mask).logits[:, -1].gather(1, before[:, :1]).sum().backward()
    optimizer.step()
    after = kv_cached_sampling(model, ids, mask, 1, settings)
    assert len(packings) == len(layers) + len(adapters)  # the base weights were kept
    assert not torch.equal(after, before)
    assert torch.equal(after, kv_cached_sampling(model, ids, mask, 1, settings, packed=False))


def test_with_keeping_off_frozen_weights_are_packed_at_every_call(tiny_causal, tokenizer, packings, monkeypatch):
    monkeypatch.setattr(packed_module, "KEEP_FROZEN", False)
    model = tiny_causal.requires_grad_(False)
    ids, mask = encode(tokenizer, PROMPTS)
    for _ in range(2):
        kv_cached_sampling(model, ids, mask, 2, Decoding(4, EOS, PAD, greedy=True))
    assert len(packings) == 2 * len(packable_layers(model))
    assert kept_packed_mib(model) == 0


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_sibling_layers_multiply_as_one_product_with_the_same_outputs(monkeypatch, packings, packed_products,
                                                                      dtype, bias):
    """q, k, v (and gate, up) of each layer: one packed weight, one product per input, bit for bit the outputs
    of the layers packed one by one."""
    model = tiny_llama(attention_bias=bias, mlp_bias=bias).to(dtype)
    ids, mask = torch.randint(4, 97, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    groups = packed_module.sibling_groups(model, packable_layers(model))
    assert groups == [group for b in model.model.layers for group in (
        (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj), (b.mlp.gate_proj, b.mlp.up_proj))]
    grouped = logits(model, ids, mask, packed=True)
    assert len(packings) == len(packable_layers(model)) - 2 * (3 + 2) + 2 * 2  # 7 layers a block packed as 3
    assert len(packed_products) == 2 * 4 + 1  # o, down, one for q/k/v and one for gate/up, and the head
    monkeypatch.setattr(packed_module, "sibling_groups", lambda model, layers: [])
    assert torch.equal(grouped, logits(model, ids, mask, packed=True))
    torch.testing.assert_close(grouped, logits(model, ids, mask, packed=False), atol=1e-5 if dtype == torch.float32
                               else 5e-2, rtol=1e-5 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("inference", [False, True])
def test_a_sibling_multiplies_its_own_input_when_it_is_another_tensor_or_was_changed_in_place(inference):
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    with torch.inference_mode() if inference else torch.no_grad():
        x, y = torch.randn(2, 1, 48), torch.randn(2, 1, 48)  # inference tensors under inference_mode: no version
        expected = [v(y), k(x + 1)]
        with packed_weights(model, 2):
            q(x)
            seen = [v(y)]  # another tensor (of the same version)
            if not inference:  # an inference tensor tracks no version: changed in place, it is not seen (documented)
                q(x)
                x.add_(1)
                seen.append(k(x))  # the same tensor, changed in place
    for got, want in zip(seen, expected, strict=False):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_siblings_wrapped_by_lora_are_not_grouped_and_the_rest_are(packings):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    groups = packed_module.sibling_groups(model, packable_layers(model))
    assert [[name for name, module in model.named_modules() if module in group] for group in groups] == [
        [f"base_model.model.model.layers.{i}.mlp.gate_proj", f"base_model.model.model.layers.{i}.mlp.up_proj"]
        for i in range(2)]
    ids, mask = torch.randint(4, 97, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids, mask, packed=True), logits(model, ids, mask, packed=False),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", [optimizer_step, in_place_copy, assign_data])
def test_a_kept_sibling_product_is_never_used_after_one_of_its_weights_changed(packings, change):
    model = tiny_llama().requires_grad_(False)
    ids, mask = torch.randint(4, 97, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    with torch.no_grad():
        before = logits(model, ids, mask, packed=True)
        assert torch.equal(logits(model, ids, mask, packed=True), before)
    packed_once = len(packings)
    assert packed_once == 2 * 4 + 1 and kept_packed_mib(model) > 0  # kept, not packed again
    change(model)
    with torch.no_grad():
        plain_after = logits(model, ids, mask, packed=False)
        assert (plain_after - before).abs().max() > 1e-3
        torch.testing.assert_close(logits(model, ids, mask, packed=True), plain_after, atol=1e-5, rtol=1e-5)


def test_a_siblings_output_is_its_own_contiguous_tensor_as_its_plain_forward_returns():
    """Not a view of the shared product: a caller (or a hook) writing into one output changes no other, the same
    sibling called again gives its product, and ``.view`` works as on the plain output."""
    attention = (model := tiny_llama()).model.layers[0].self_attn
    q, k = attention.q_proj, attention.k_proj
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        expected = [q(x), k(x)]
        with packed_weights(model, 2):
            q(x).mul_(0)
            seen = [q(x), k(x)]
    assert all(output.is_contiguous() for output in seen)
    assert seen[1].view(-1).shape == (2 * 3 * 16,)
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inference", [False, True])
def test_a_sibling_called_again_on_its_input_changed_through_data_multiplies_the_new_values(inference):
    """Writes through ``x.data`` (and any in-place write to an inference tensor) bump no version: the same
    sibling called again multiplies again rather than reuse its product."""
    attention = (model := tiny_llama()).model.layers[0].self_attn
    with torch.inference_mode() if inference else torch.no_grad():
        x = torch.randn(2, 1, 48)
        expected = attention.q_proj(x + 1)
        with packed_weights(model, 2):
            attention.q_proj(x)
            x.data.add_(1)
            seen = attention.q_proj(x)
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=1e-5)


def test_sibling_slices_follow_the_weights_when_out_features_was_not_updated():
    attention = (model := tiny_llama()).model.layers[0].self_attn
    attention.k_proj.weight = torch.nn.Parameter(torch.randn(8, 48))  # k_proj.out_features still says 16
    layers, x = (attention.q_proj, attention.k_proj, attention.v_proj), torch.randn(2, 3, 48)
    with torch.no_grad():
        expected = [layer(x) for layer in layers]
        with packed_weights(model, 2):
            seen = [layer(x) for layer in layers]
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trainable", ["input", "biases"])
def test_gradients_through_frozen_weights_reach_the_input_and_trainable_biases(monkeypatch, packed_products,
                                                                                trainable):
    """Prompt tuning (gradients wanted for the input embeddings) and BitFit (only the biases trainable): the layers
    multiply plainly, as the packed product has no backward, and the gradients are the plain ones."""
    monkeypatch.setattr(packed_module, "_WARNED", set())
    model = tiny_llama(attention_bias=True, mlp_bias=True).requires_grad_(False)
    ids = torch.randint(4, 97, (2, 5))
    embeds = model.model.embed_tokens(ids).requires_grad_(trainable == "input")
    if trainable == "biases":
        for layer in packable_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
    wrt = embeds if trainable == "input" else model.model.layers[0].self_attn.k_proj.bias

    def gradient(packed: bool) -> torch.Tensor:
        with packed_weights(model, 2) if packed else torch.enable_grad():
            loss = model(inputs_embeds=embeds).logits.square().mean()
        return torch.autograd.grad(loss, wrt)[0]

    with pytest.warns(RuntimeWarning, match="gradients are wanted"):
        packed = gradient(True)
    assert not packed_products
    assert torch.equal(packed, gradient(False))


def test_at_the_exit_of_keep_packed_weights_a_sibling_product_holding_a_weight_it_froze_is_freed():
    model = tiny_llama().requires_grad_(False)
    k_proj = model.model.layers[0].self_attn.k_proj.requires_grad_(True)  # q and v were frozen before
    ids, mask = torch.randint(4, 97, (3, 9)), torch.ones(3, 9, dtype=torch.long)

    def kept_layers() -> set[int]:
        return {layer for module in model.modules() for kept in packed_module._KEPT.get(module, {}).values()
                for layer in kept.layers}

    with keep_packed_weights(model):
        logits(model, ids, mask, packed=True)
        assert id(k_proj) in kept_layers()
    assert id(k_proj) not in kept_layers() and kept_packed_mib(model) > 0  # the other layers' copies stay


@pytest.mark.parametrize("layer", ["q_proj", "o_proj"])
def test_an_input_of_another_dtype_than_the_weights_is_refused_as_the_plain_layer_refuses_it(layer):
    attention = (model := tiny_llama()).model.layers[0].self_attn
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16)  # no autocast to cast it: plain F.linear refuses it
    with torch.no_grad(), packed_weights(model, 2), pytest.raises(RuntimeError, match="same dtype"):
        getattr(attention, layer)(x)


def test_under_a_bf16_autocast_a_float64_model_multiplies_in_float64_as_autocast_leaves_it(monkeypatch):
    monkeypatch.setattr(packed_module, "_WARNED", set())
    model = tiny_llama().double()
    ids, mask = torch.randint(4, 97, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = logits(model, ids, mask, packed=False)
        with pytest.warns(RuntimeWarning, match="float64"):
            packed = logits(model, ids, mask, packed=True)
    assert plain.dtype == packed.dtype == torch.float64
    assert torch.equal(packed, plain)


def test_a_layer_packed_with_other_siblings_replaces_its_kept_copy(packings):
    """A sibling replaced (or wrapped by LoRA, or unwrapped): the first layer's copy is packed again with the new
    siblings and the old one freed, not kept beside it."""
    model = tiny_llama().requires_grad_(False)
    ids, mask = torch.randint(4, 97, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    logits(model, ids, mask, packed=True)
    kept = kept_packed_mib(model)
    model.model.layers[0].self_attn.k_proj = torch.nn.Linear(48, 16, bias=False).requires_grad_(False)
    torch.testing.assert_close(logits(model, ids, mask, packed=True), logits(model, ids, mask, packed=False),
                               atol=1e-5, rtol=1e-5)
    assert len(packings) == 2 * 4 + 1 + 1  # the new q, k, v product
    assert kept_packed_mib(model) == kept


def test_a_kept_base_weight_is_never_used_after_merge_and_unload():
    """peft merges by writing ``weight.data`` in place (no version) and unloading drops the LoRA layer whose
    merged adapters told: the base layer, plain again, is packed again."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False))
    ids, mask = torch.randint(4, 97, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    logits(model, ids, mask, packed=True)  # the base o_proj weights packed and kept
    merged = model.merge_and_unload()
    assert all(type(block.self_attn.o_proj) is torch.nn.Linear for block in merged.model.layers)
    torch.testing.assert_close(logits(merged, ids, mask, packed=True), logits(merged, ids, mask, packed=False),
                               atol=1e-5, rtol=1e-5)


def test_siblings_with_forward_pre_hooks_are_not_grouped_as_a_hook_may_set_the_weight_at_their_own_call():
    """``torch.nn.utils.prune`` sets ``weight`` = weight_orig ⊙ mask in a pre-hook: a product run at q_proj's call
    would read k_proj's weight of its last call."""
    from torch.nn.utils import prune

    model = tiny_llama().requires_grad_(False)
    attention = model.model.layers[0].self_attn
    prune.l1_unstructured(attention.k_proj, "weight", amount=0.5)
    attention.k_proj.weight_mask.zero_()  # k_proj's next call multiplies by zeros
    assert packed_module.sibling_groups(model, packable_layers(model))[0] == (model.model.layers[0].mlp.gate_proj,
                                                                              model.model.layers[0].mlp.up_proj)
    ids, mask = torch.randint(4, 97, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    torch.testing.assert_close(logits(model, ids, mask, packed=True), logits(model, ids, mask, packed=False),
                               atol=1e-5, rtol=1e-5)


def test_a_layer_whose_weights_are_not_on_the_cpu_runs_its_plain_forward(monkeypatch, packed_products):
    """Weights on the meta device (not loaded yet) with an input on the CPU: what the plain layer does, not a
    oneDNN error."""
    monkeypatch.setattr(packed_module, "_WARNED", set())
    model = tiny_llama().requires_grad_(False)
    o_proj = model.model.layers[0].self_attn.o_proj.to("meta")
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        plain = o_proj(x)
        with packed_weights(model, 2), pytest.warns(RuntimeWarning, match="device meta"):
            packed = o_proj(x)
    assert not packed_products and (packed.shape, packed.device) == (plain.shape, plain.device)


def test_only_the_active_adapters_layers_are_packed_so_packing_does_not_grow_with_the_adapters_loaded(
        tiny_causal, tokenizer):
    """A process serving an adapter per user: the layers packed, and the modules walked to find them, are the
    base model's and the active adapter's, whatever else is loaded (with 400 adapters an answer of the toy
    model took 0.39 s instead of 0.11 s when every loaded adapter's layers were walked and packed)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(peaked(tiny_causal), lora)
    one = packable_layers(model)
    walked = len(list(packed_module.base_modules(model)))
    for n in range(20):
        model.add_adapter(f"user-{n}", lora)
    model.set_adapter("user-7")
    layers = packable_layers(model)
    assert len(layers) == len(one) and len(list(packed_module.base_modules(model))) == walked
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert {id(m.lora_A["user-7"]) for m in lora_layers} <= {id(layer) for layer in layers}
    assert not {id(m.lora_A["default"]) for m in lora_layers} & {id(layer) for layer in layers}
    ids, mask = encode(tokenizer, PROMPTS)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with packed_weights(model, ids.shape[0]):
            packed = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)
