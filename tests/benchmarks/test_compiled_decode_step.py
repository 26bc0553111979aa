"""The compiled-step benchmark computes the written-out step's logits (what it times is the same step)."""

import importlib.util
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, StaticCache

from rlhfkit.models.decode import llama_step

spec = importlib.util.spec_from_file_location("compiled_decode_step", Path(__file__).parents[2] / "benchmarks" /
                                              "compiled_decode_step.py")
compiled_decode_step = sys.modules["compiled_decode_step"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compiled_decode_step)


def test_the_compiled_step_over_packed_weights_gives_the_written_out_steps_logits_and_writes_the_cache():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().requires_grad_(False)
    rows, length, prompt = 3, 16, 4
    token, position = torch.randint(0, 97, (rows, 1)), torch.full((rows, 1), prompt)
    attend = torch.zeros(rows, 1, 1, length, dtype=torch.bool)
    attend[..., :prompt + 1] = True
    caches = []
    for _ in range(2):  # one cache for each step, filled by the same prefill
        cache = StaticCache(config=config, max_cache_len=length)
        with torch.no_grad():
            model(input_ids=torch.arange(rows * prompt).view(rows, prompt) % 97, cache=cache, use_cache=True)
        caches.append(cache)
    with torch.no_grad():
        expected = llama_step(model, token, position, prompt, attend, caches[0])
        step = compiled_decode_step.compiled_step(model, rows)
        got = step(token, position, torch.tensor([prompt]), attend, [layer.keys for layer in caches[1].layers],
                   [layer.values for layer in caches[1].layers])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(caches[1].layers, caches[0].layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)
