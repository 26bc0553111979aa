"""A question for the rollout engine: would SmolLM2's decode step, compiled over oneDNN-packed weights, reach
2× `generate`'s tokens/s in fp32 on a CPU?

The engine's step (``rlhfkit.models.decode.llama_step`` with ``packed_weights``) multiplies at the read
bandwidth; what is left is per-op overhead, which ``torch.compile`` removes. But inductor refuses the packed
(mkldnn-layout) weights as graph inputs, and ``compiled_kv_cached_sampling`` therefore compiles over plain
weights. Here each product is an opaque custom op, ``packed_linear(x, key, out)``, that looks its packed
weight up by an int (q, k and v as one weight, gate and up as one), and inductor compiles everything around it
(norms, rotary positions, attention, the MLP's gate), the cache written with ``index_copy_`` at a tensor index
so that one graph serves every step. Frozen weights only (packed once); no LoRA, no draw inside the graph: a
measurement, not an engine.

Timed (median of ``--repeats``, one process, the sides interleaved): one step of the written-out step plain
and packed, and of the compiled one; one decode step of ``generate`` (its 33-token call minus its 1-token call,
÷ 32, sampling at τ 1 without top-k); the median over ``--rounds``. Also: the compile's seconds, and the
compiled logits' largest difference from the written-out step's. Writes
benchmarks/results/compiled_decode_step-<time>.json.

    python benchmarks/compiled_decode_step.py [--rows 8] [--cache 128] [--repeats 20] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

PACKED: list[torch.Tensor] = []  # packed weights, looked up by the custom op's int key


@torch.library.custom_op("rlhfkit_bench::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, key: int, out: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, PACKED[key], None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, key: int, out: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out)


def pack(weight: torch.Tensor, rows: int) -> int:
    PACKED.append(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows))
    return len(PACKED) - 1


def compiled_step(model, rows: int):
    """The step of ``llama_step`` with every product a ``packed_linear``, compiled (lazily, at its first call)."""
    from rlhfkit.models.decode import _rms_norm, _rotate

    body, config = model.model, model.config
    keys = [(pack(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), rows), pack(a.o_proj.weight, rows),
             pack(torch.cat([m.gate_proj.weight, m.up_proj.weight]), rows), pack(m.down_proj.weight, rows))
            for a, m in ((layer.self_attn, layer.mlp) for layer in body.layers)]
    head = pack(model.lm_head.weight, rows)
    d = config.hidden_size // config.num_attention_heads
    kv_heads, inner = config.num_key_value_heads, config.intermediate_size
    q_width, kv_width = config.num_attention_heads * d, kv_heads * d

    def step(token, position, index, attend, cached_keys, cached_values):
        h = body.embed_tokens(token)
        cos, sin = body.rotary_emb(h, position)
        half = sin.shape[-1] // 2
        cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]
        for layer, (qkv, o_proj, gate_up, down), k_cache, v_cache in zip(body.layers, keys, cached_keys,
                                                                          cached_values, strict=True):
            x = _rms_norm(h, layer.input_layernorm).view(rows, -1)
            q, k, v = packed_linear(x, qkv, q_width + 2 * kv_width).split((q_width, kv_width, kv_width), dim=-1)
            q = _rotate(q.view(rows, kv_heads, -1, d), cos, sin)
            k_cache.index_copy_(2, index, _rotate(k.view(rows, kv_heads, d), cos[:, 0], sin[:, 0]).unsqueeze(2))
            v_cache.index_copy_(2, index, v.view(rows, kv_heads, 1, d))
            o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=attend, scale=layer.self_attn.scaling)
            h = h + packed_linear(o.reshape(rows, -1), o_proj, config.hidden_size).view(rows, 1, -1)
            x = _rms_norm(h, layer.post_attention_layernorm).view(rows, -1)
            gate, up = packed_linear(x, gate_up, 2 * inner).split((inner, inner), dim=-1)
            h = h + packed_linear(F.silu(gate) * up, down, config.hidden_size).view(rows, 1, -1)
        return packed_linear(_rms_norm(h, body.norm).view(rows, -1), head, config.vocab_size)

    return torch.compile(step, dynamic=False, fullgraph=True)


def milliseconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--cache", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import StaticCache

    from rlhfkit.demo.presets import cache_dir, load_smollm2
    from rlhfkit.generate import format_prompt
    from rlhfkit.models.decode import llama_step
    from rlhfkit.models.packed import packed_weights

    if not (cache_dir() / "smollm2-135m-instruct" / "config.json").exists():
        sys.exit("SmolLM2-135M-Instruct: no dequantised copy in the cache (run the smollm2 demo once)")
    model, tokenizer = load_smollm2()
    model.eval().requires_grad_(False)
    rows, length, config = args.rows, args.cache, model.config
    generator = torch.Generator().manual_seed(0)
    prompt = 5
    cache = StaticCache(config=config, max_cache_len=length)
    token = torch.randint(0, config.vocab_size, (rows, 1), generator=generator)
    position = torch.full((rows, 1), prompt)
    attend = torch.zeros(rows, 1, 1, length, dtype=torch.bool)
    attend[..., :prompt + 1] = True
    index = torch.tensor([prompt])
    with torch.no_grad():
        model(input_ids=torch.randint(0, config.vocab_size, (rows, prompt), generator=generator), cache=cache,
              use_cache=True)  # fills the cache's layers as a prefill does
        k_cache, v_cache = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
        reference = llama_step(model, token, position, prompt, attend, cache)
        step = compiled_step(model, rows)
        started = time.perf_counter()
        logits = step(token, position, index, attend, k_cache, v_cache)
        compile_s = time.perf_counter() - started
        texts = [format_prompt(p, tokenizer, True) for p in ("How do I fix a flat bike tyre?", "Write a short poem.")]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        per_prompt = rows // len(texts)
        ids, mask = (encoded[k].repeat_interleave(per_prompt, 0) for k in ("input_ids", "attention_mask"))

        def generate(new: int) -> None:
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new, min_new_tokens=new,
                           top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)

        sides = {"written_out_plain": lambda: llama_step(model, token, position, prompt, attend, cache),
                 "compiled_packed": lambda: step(token, position, index, attend, k_cache, v_cache)}
        timings: dict[str, list[float]] = {name: [] for name in [*sides, "written_out_packed", "generate_step"]}
        for _ in range(args.rounds):  # interleaved rounds; each a median of repeats (generate: one call each)
            for name, run in sides.items():
                timings[name].append(milliseconds(run, args.repeats))
            with packed_weights(model, rows):
                timings["written_out_packed"].append(
                    milliseconds(lambda: llama_step(model, token, position, prompt, attend, cache), args.repeats))
            long = milliseconds(lambda: generate(33), 1)
            short = milliseconds(lambda: generate(1), 1)
            timings["generate_step"].append((long - short) / 32)
    result = {"model": "SmolLM2-135M-Instruct", "dtype": "fp32", "rows": rows, "cache": length,
              "threads": args.threads, "compile_s": round(compile_s, 1),
              "max_abs_logit_difference": float((logits - reference).abs().max()),
              "ms_per_step": {name: round(statistics.median(values), 1) for name, values in timings.items()},
              "torch": torch.__version__}
    generate_ms = result["ms_per_step"]["generate_step"]
    result["speedup_vs_generate"] = {name: round(generate_ms / ms, 2) for name, ms in result["ms_per_step"].items()
                                     if name != "generate_step"}
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / f"compiled_decode_step-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
