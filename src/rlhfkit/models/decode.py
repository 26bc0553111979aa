"""One decode step of a causal LM, written out for the rollout engine's inner loop.

A decode step reads one new token per sequence against the KV cache the prefill filled. transformers'
forward does work at every call that this step does not need: its keyword and output plumbing, a 4-D
mask built again from the 2-D one, the attention function looked up by name in every layer, every
submodule called through ``nn.Module.__call__``. At SmolLM2-135M's shapes (bf16, packed weights, 8 rows, a
cache of 128) writing the step out took it from 40.3 to 36.9 ms (2 threads, idle). The steps below compute
the same layers in the same order:

    h⁰ = embed(y_t) (+ position embedding, GPT-2)
    hˡ⁺¹ = hˡ + Attn(norm₁(hˡ)) ;  hˡ⁺¹ ← hˡ⁺¹ + MLP(norm₂(hˡ⁺¹))          for each layer l
    Attn(x) = W_o · softmax(q Kᵀ · s + M) V,   q = rot(W_q x), K[:, :, t] = rot(W_k x), V[:, :, t] = W_v x
    z = lm_head(norm(hᴸ))

with the model's own linear layers (so packed weights, LoRA adapters and autocast apply as in its own
forward), its rotary embedding, norms' weights and activation, and the attention kernel transformers uses
for one query (``scaled_dot_product_attention``, the query heads grouped by key/value head); this step's K
and V are written at ``index`` (a tensor [1], so that a compiled step is one graph for every step) of
transformers' ``StaticCache``; M is −∞ where ``attend`` is False.
The logits are bit for bit the model's forward's (SmolLM2 in fp32, bf16 and under bf16 autocast;
``tests/models/test_decode.py`` on tiny models).

Families: Llama-style (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``: RMSNorm, rotary
positions, a gated MLP, grouped-query attention) and ``GPT2LMHeadModel``. ``decode_step(model, cache_length)``
returns None, and the engine calls the model's own forward, for any other model, and wherever the modules whose
forward this step computes itself (the model, its decoder, layers, attentions, Llama's MLPs and norms) might not
compute what is written here: one of them or a dropout in it in training mode, an attention other than sdpa
(eager differs from sdpa in bf16: its own softmax and rounding; flash kernels on a GPU), a class that is not
transformers' own (a subclass, a kernel patched in, a peft ``modules_to_save`` copy of a norm), a forward hook
or a forward replaced on one of them (a steering hook, accelerate's offloading), layers that do not read the
cache's layers in order (a config counting fewer layers than the model has), a sliding window shorter than the
cache, GPT-2 with cross-attention layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import (
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
    StaticCache,
)

DecodeStep = Callable[[PreTrainedModel, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, StaticCache],
                      torch.Tensor]


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """LlamaRMSNorm: w · (x / √(mean x² + ε)), computed in fp32 and cast back before the weight, op for op as
    transformers computes it (``F.rms_norm`` sums in another order: fp32 logits 1e-5 apart, enough to change a
    draw now and then, and with it a whole run)."""
    h = x.float()
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions as Llama applies them, x cos + rotate_half(x) sin with rotate_half(x) = [−x₂, x₁],
    computed as x cos + [x₂, x₁] [−sin₁, sin₂] (``signed_sin``): the same products, one op fewer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def llama_step(model: PreTrainedModel, token: torch.Tensor, position: torch.Tensor, index: torch.Tensor,
               attend: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    """Next-token logits [R, V] of a Llama-style model for ``token`` [R, 1] at ``position`` [R, 1], its K and V
    written at cache slot ``index`` [1]; ``attend`` [R, 1, 1, L]: the cache slots each row attends to."""
    body = model.model
    h = body.embed_tokens(token)
    cos, sin = body.rotary_emb(h, position)
    half = sin.shape[-1] // 2
    cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]  # [R, 1, 1, d]
    rows = h.shape[0]
    for layer, kv in zip(body.layers, cache.layers, strict=True):
        attention, mlp = layer.self_attn, layer.mlp
        x = _rms_norm(h, layer.input_layernorm)
        heads, d = kv.keys.shape[1], attention.head_dim
        q = _rotate(attention.q_proj(x).view(rows, heads, -1, d), cos, sin)  # query heads grouped by KV head
        kv.keys.index_copy_(2, index, _rotate(attention.k_proj(x).view(rows, heads, 1, d), cos, sin))
        kv.values.index_copy_(2, index, attention.v_proj(x).view(rows, heads, 1, d))
        o = F.scaled_dot_product_attention(q, kv.keys, kv.values, attn_mask=attend, scale=attention.scaling)
        h = h + attention.o_proj(o.reshape(rows, 1, -1))
        x = _rms_norm(h, layer.post_attention_layernorm)
        h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    return model.lm_head(_rms_norm(h, body.norm))[:, -1]


def gpt2_step(model: PreTrainedModel, token: torch.Tensor, position: torch.Tensor, index: torch.Tensor,
              attend: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    """``llama_step`` for GPT-2: learned positions, LayerNorms, one product for q, k and v, GELU MLP."""
    body = model.transformer
    h = body.wte(token) + body.wpe(position)
    rows = h.shape[0]
    for block, kv in zip(body.h, cache.layers, strict=True):
        attention = block.attn
        q, k, v = attention.c_attn(block.ln_1(h)).split(attention.split_size, dim=2)
        heads, d = kv.keys.shape[1], attention.head_dim
        kv.keys.index_copy_(2, index, k.view(rows, heads, 1, d))
        kv.values.index_copy_(2, index, v.view(rows, heads, 1, d))
        o = F.scaled_dot_product_attention(q.view(rows, heads, 1, d), kv.keys, kv.values, attn_mask=attend,
                                           scale=attention.scaling)
        h = h + attention.c_proj(o.reshape(rows, 1, -1))
        h = h + block.mlp(block.ln_2(h))
    return model.lm_head(body.ln_f(h))[:, -1]


def _written_out_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The modules whose forward the step computes itself rather than calls (so neither their class's forward
    nor their hooks run): the model, its decoder, every layer and attention, and a Llama-style layer's MLP and
    norms."""
    if isinstance(model, GPT2LMHeadModel):
        body = model.transformer
        return [model, body, *(module for block in body.h for module in (block, block.attn))]
    body = model.model
    return [model, body, body.norm, *(module for layer in body.layers for module in (
        layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm))]


def _computes_as_written(module: torch.nn.Module, source: str) -> bool:
    """Whether ``module`` is a class of transformers' modeling file ``source`` with its own forward (not one set
    on the class or the instance: a kernel, accelerate's hooks) and no torch hook that calling it would run."""
    kind = type(module)
    hooked = bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in vars(module)
    return kind.__module__ == kind.forward.__module__ == source and not hooked


def _drops_out(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a dropout directly in it (GPT-2's) is in training mode: dropout the step leaves out.
    (Modules the step calls, such as peft's LoRA layers and their dropout, run as in the model's forward.)"""
    return module.training or any(child.training for child in module.children() if isinstance(child, torch.nn.Dropout))


# The transformers classes each step writes out (exactly these: a subclass may compute something else).
STEPS: dict[type, DecodeStep] = {LlamaForCausalLM: llama_step, MistralForCausalLM: llama_step,
                                 Qwen2ForCausalLM: llama_step, GPT2LMHeadModel: gpt2_step}


def decode_step(model: PreTrainedModel, cache_length: int) -> DecodeStep | None:
    """The written-out decode step for ``model`` (a transformers causal LM), or None where its own forward
    must run (see the module docstring)."""
    config, step = model.config, STEPS.get(type(model))
    if step is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    source, modules = type(model).__module__, _written_out_modules(model)
    if not all(_computes_as_written(module, source) and not _drops_out(module) for module in modules):
        return None
    # transformers reads cache layer ``layer_idx`` in each attention (Llama-style: in its first num_hidden_layers
    # layers); the step reads the cache's layers in order, one per layer.
    layer_indices = [module.layer_idx for module in modules if hasattr(module, "layer_idx")]
    if layer_indices != list(range(config.num_hidden_layers)):
        return None
    if step is gpt2_step:
        return None if config.add_cross_attention else step
    # A sliding layer's StaticCache keeps the last `window` tokens (in Llama, which ignores the field, every layer's)
    window = getattr(config, "sliding_window", None)
    return None if window and window < cache_length else step
