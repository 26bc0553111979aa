"""Rollout generation: tokens/s of `transformers` `generate` vs rlhfkit's engine, same shapes, sampling and precision.

Every side samples from softmax(logits / τ) with every completion exactly ``max_new_tokens`` long (EOS
forbidden before, as the shared workload's ``min_new_tokens``), n samples per prompt:
  (a) the shared workload's 5.3M GPT-2 policy at GRPO's shapes (8 prompts × 4 samples, 16 + 32 tokens);
  (b) SmolLM2-135M-Instruct (the demo's cached dequantised copy, else skipped) at 2 prompts × 4 samples
      with the chat template, 32 new tokens.
Each model runs three times: fp32 weights, bf16 weights (a bf16 copy of the same weights), and the fp32 weights
under a CPU bf16 autocast (as the RL trainers sample: fp32 master weights, products in bf16), on every side.
The sides are ``generate``, the engine with plain matrix products (``kv_cached_sampling(packed=False)``), the
engine with packed weights (``kv_cached_sampling``, its default: ``rlhfkit.models.packed``) in the two cases a
user meets — ``packed``: trainable weights, packed again at every call (an RL rollout with full fine-tuning,
whose weights change between rollouts); ``kept``: frozen weights (a copy of the model with
``requires_grad=False``), packed at the first call and reused by every later one (``rlhfkit generate``,
evaluation, LoRA's base weights) — and the engine with its decode step compiled
(``compiled_kv_cached_sampling``; the compile happens in the untimed first call, its seconds are reported), on
the trainable weights (``compiled``: weights are inputs of the graph) and on the frozen copy (``compiled_kept``:
weights folded into the graph as constants, packed by inductor's freezing).
They run interleaved (generate, engine, packed, kept, compiled, generate, ...) in one process with the same
torch threads, so load from other processes hits all alike; each ratio is the median of the per-round ratios.

With LoRA (``lora_rollout``, SmolLM2 only): the RL trainers' case, rollouts under bf16 autocast (where the
CPU has bf16) of the model with LoRA on every linear layer (``add_lora``'s default): the base weights are
frozen and kept, the adapters trainable and packed at every call; against the same calls with every weight
packed at every call (the kept copies forgotten before each), interleaved.

Where a decode step's time goes (``step_time``): the forward pass of one step (eager, packed, compiled on the
trainable and on the frozen weights: the written-out step where the model has one), its
matrix products alone (each weight matrix multiplied once at the step's shape, plain and packed), the
packing of every weight (once per rollout call), and the draw of the next token from the step's logits.
Writes benchmarks/results/generation_speed-<time>.json.

    python benchmarks/generation_speed.py [--rounds 8] [--smollm2-rounds 3] [--skip-smollm2 | --skip-workload]
        [--precisions fp32,bf16,autocast] [--threads 2] [--bench-dir ../shared/bench]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

TARGET = 2.0
SIDES = ("generate", "engine", "packed", "kept", "compiled", "compiled_kept")


def timed(run) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``run()`` (CPU seconds move less when other processes load the
    machine; with more than one thread they include the threads' spinning)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(sides: dict, rounds: int) -> dict:
    """Run each side once per round, in turn; tokens/s per side (median) and, for each side after the first,
    the median per-round ratio of its tokens/s to the first's. The untimed first call's seconds are kept
    (the compiled side compiles there)."""
    first = {}
    tokens = {}
    for name, run in sides.items():
        started = time.perf_counter()
        tokens[name] = int(run().numel())
        first[name] = round(time.perf_counter() - started, 2)
    seconds = {name: [] for name in sides}
    cpu_seconds = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            wall, cpu = timed(run)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
    base, *others = sides

    def ratios(times: dict) -> dict:
        return {name: round(statistics.median(b / o for b, o in zip(times[base], times[name], strict=True)), 3)
                for name in others}

    return {"tokens_per_call": tokens, "first_call_s": first,
            "tokens_per_s": {name: round(tokens[name] / statistics.median(s), 1) for name, s in seconds.items()},
            "seconds_per_call": {name: [round(x, 4) for x in s] for name, s in seconds.items()},
            "cpu_seconds_per_call": {name: [round(x, 4) for x in s] for name, s in cpu_seconds.items()},
            "ratio": ratios(seconds), "cpu_ratio": ratios(cpu_seconds),
            "ratio_is": f"side tokens/s ÷ {base} tokens/s (cpu_ratio: the same in process CPU seconds)"}


def step_time(model, frozen, rows: int, cache_length: int, repeats: int = 10) -> dict:
    """Milliseconds (median of ``repeats``) of one decode step's parts at ``rows`` sequences: the forward
    pass eager, with packed weights and compiled (the compiled engine's step: same rows and cache length; on
    ``model`` and on ``frozen``, its copy with frozen weights),
    its matrix products alone (plain, packed), packing every weight, and the draw from [rows, V] logits; the
    packed copy's MiB."""
    import torch
    from transformers import StaticCache

    from rlhfkit.models.decode import decode_step
    from rlhfkit.models.engine import DecodeStepModule, Decoding, compiled_step, draw, next_token_logits
    from rlhfkit.models.packed import packable_layers, packed_weights, sibling_groups

    def milliseconds(run) -> float:
        run()
        return round(1e3 * statistics.median(timed(run)[0] for _ in range(repeats)), 2)

    parameter = next(model.parameters())
    cache = StaticCache(config=model.config, max_cache_len=cache_length)
    token = torch.zeros(rows, 1, dtype=torch.long)
    mask = torch.ones(rows, cache_length, dtype=torch.long)
    position = torch.zeros(rows, 1, dtype=torch.long)
    parts = {}

    def step(forward=model):
        for layer in cache.layers:  # always write at slot 0: a step's cost does not depend on the slot
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()
        return forward(input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)

    parts["forward"] = milliseconds(step)
    with packed_weights(model, rows):
        parts["forward_packed"] = milliseconds(step)
    attend, index = mask.bool()[:, None, None], torch.zeros(1, dtype=torch.long)
    for name, net in (("forward_compiled", model), ("forward_compiled_frozen", frozen)):
        compiled = compiled_step(net, DecodeStepModule(net, decode_step(net, cache_length), "cache"))
        parts[name] = milliseconds(partial(compiled, token, position, index, attend, mask, cache))

    def packed_step():  # a fresh context packs every weight again, at its first step
        with packed_weights(model, rows):
            step()

    parts["packing"] = round(milliseconds(packed_step) - parts["forward_packed"], 2)
    # each weight-matrix layer called on [rows, its input width]: the same kernel as in the step; siblings (q, k, v;
    # gate, up) on one input, as in the step, where packed they share one product (each on its own input would
    # compute the whole product once per sibling)
    inputs = {layer: group[0] for group in sibling_groups(model, packable_layers(model)) for layer in group}
    drawn, products = {}, []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or isinstance(module, torch.nn.Embedding):
            continue
        width = weight.shape[0 if type(module).__name__ == "Conv1D" else 1]  # GPT-2's Conv1D: [in, out] weights
        key = inputs.get(module, module)
        if key not in drawn:
            drawn[key] = torch.randn(rows, width, dtype=parameter.dtype)
        products.append(partial(module, drawn[key]))
    parts["matrix_products"] = milliseconds(lambda: [product() for product in products])
    with packed_weights(model, rows):
        parts["matrix_products_packed"] = milliseconds(lambda: [product() for product in products])
    logits = torch.randn(rows, model.config.vocab_size, dtype=parameter.dtype)
    sampling = Decoding(1, None, 0)
    parts["draw"] = milliseconds(lambda: draw(next_token_logits(logits, 0, sampling), False, None))
    parts["weights_mib"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)
    parts["packed_mib"] = round(sum(m.weight.numel() * m.weight.element_size() for m in packable_layers(model))
                                / 2**20, 1)
    return parts


def compare(model, tokenizer, encoded, n: int, max_new_tokens: int, rounds: int, precisions: list[str]) -> dict:
    import torch

    from rlhfkit.models.engine import (
        Decoding,
        bucketed,
        compiled_kv_cached_sampling,
        generate_sampling,
        kv_cached_sampling,
    )

    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    decoding = Decoding(max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=1.0,
                        min_new_tokens=max_new_tokens)
    engines = dict(zip(SIDES, (generate_sampling, partial(kv_cached_sampling, packed=False), kv_cached_sampling,
                               kv_cached_sampling, compiled_kv_cached_sampling, compiled_kv_cached_sampling),
                           strict=True))
    result = {"shape": {"prompts": prompt_ids.shape[0], "samples_per_prompt": n,
                        "prompt_tokens": prompt_ids.shape[1], "new_tokens": max_new_tokens, "temperature": 1.0}}
    for precision in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "autocast": torch.float32}[precision]
        weights = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        frozen = copy.deepcopy(weights).requires_grad_(False)  # the kept side's: its packed weights are reused
        kept = {"kept", "compiled_kept"}  # the sides on the frozen copy
        sides = {name: (lambda engine=engine, weights=frozen if name in kept else weights:
                        engine(weights, prompt_ids, prompt_mask, n, decoding))
                 for name, engine in engines.items()}
        # "autocast": fp32 weights under a CPU bf16 autocast on every side, as the RL trainers sample
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            result[precision] = interleaved(sides, rounds)
            result[precision]["step_ms"] = step_time(weights, frozen, prompt_ids.shape[0] * n,
                                                     bucketed(prompt_ids.shape[1] + max_new_tokens))
        del frozen
    return result


def lora_rollout(model, tokenizer, encoded, n: int, max_new_tokens: int, rounds: int) -> dict:
    """CPU seconds per rollout call of ``model`` with LoRA on every linear layer, under bf16 autocast where the
    CPU has bf16 (as the RL trainers sample): base weights kept between calls against every weight packed at
    every call; the MiB kept."""
    import torch

    from rlhfkit.models.engine import Decoding, kv_cached_sampling
    from rlhfkit.models.packed import forget_packed_weights, kept_packed_mib
    from rlhfkit.models.reference import add_lora

    lora = add_lora(copy.deepcopy(model))
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    decoding = Decoding(max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        min_new_tokens=max_new_tokens)

    def call():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return kv_cached_sampling(lora, encoded["input_ids"], encoded["attention_mask"], n, decoding)

    def repacked():
        forget_packed_weights(lora)
        return call()

    result = interleaved({"base_kept": call, "all_packed": repacked}, rounds)
    cpu = {name: statistics.median(s) for name, s in result["cpu_seconds_per_call"].items()}
    call()
    return {"autocast": "bf16" if bf16 else "fp32", "cpu_s_per_rollout": {k: round(v, 3) for k, v in cpu.items()},
            "saved_ms_per_rollout": round(1e3 * (cpu["all_packed"] - cpu["base_kept"]), 1),
            "cpu_ratio": result["cpu_ratio"]["all_packed"], "kept_mib": round(kept_packed_mib(lora), 1)}


def workload_policy(W, rounds: int, precisions: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = W.prepare_artifacts()
    model = AutoModelForCausalLM.from_pretrained(paths["policy"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    encoded = tokenizer(W.prompts()[:W.GRPO.prompts_per_step], return_tensors="pt", padding=True)
    return {"model": "workload GPT-2 5.3M",
            **compare(model, tokenizer, encoded, W.GRPO.generations_per_prompt, W.COMPLETION_LEN, rounds, precisions)}


def smollm2(rounds: int, precisions: list[str]) -> dict | None:
    from rlhfkit.demo.presets import cache_dir, load_smollm2
    from rlhfkit.generate import format_prompt

    if not (cache_dir() / "smollm2-135m-instruct" / "config.json").exists():
        print("SmolLM2-135M-Instruct: no dequantised copy in the cache (run the smollm2 demo once); skipped")
        return None
    model, tokenizer = load_smollm2()
    texts = [format_prompt(p, tokenizer, True) for p in ("How do I fix a flat bike tyre?", "Write a short poem.")]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"model": "SmolLM2-135M-Instruct", **compare(model, tokenizer, encoded, 4, 32, rounds, precisions),
            "lora": lora_rollout(model, tokenizer, encoded, 4, 32, rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--smollm2-rounds", type=int, default=3)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-workload", action="store_true", help="SmolLM2 only")
    parser.add_argument("--precisions", default="fp32,bf16,autocast",
                        help="on every side: fp32 weights, bf16 weights, fp32 weights under bf16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the workload's)")
    parser.add_argument("--bench-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "bench"))
    args = parser.parse_args()
    sys.path.insert(0, args.bench_dir)
    import bench_common as B
    import torch
    import transformers
    import workload as W

    B.setup_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    if not set(precisions) <= {"fp32", "bf16", "autocast"}:
        parser.error(f"--precisions: a comma-separated choice of fp32, bf16, autocast; got {args.precisions!r}")
    runs = [] if args.skip_workload else [workload_policy(W, args.rounds, precisions)]
    if not args.skip_smollm2:
        runs.append(smollm2(args.smollm2_rounds, precisions))
    runs = [r for r in runs if r is not None]
    print(f"{'model':22} {'weights':>7} {'generate':>9} " + " ".join(f"{side:>9} {'ratio':>11}" for side in SIDES[1:])
          + f" {'target':>6} {'compile s':>13}   decode step ms: forward, packed, compiled, compiled frozen, "
          "matrix products plain, packed, packing, draw; packed MiB")
    for r in runs:
        for precision in precisions:
            run, step, first = r[precision], r[precision]["step_ms"], r[precision]["first_call_s"]
            sides = " ".join(f"{run['tokens_per_s'][side]:>9} {run['ratio'][side]:>5.2f} ({run['cpu_ratio'][side]:.2f})"
                             for side in SIDES[1:])
            print(f"{r['model']:22} {precision:>7} {run['tokens_per_s']['generate']:>9} {sides} "
                  f"{'≥ ' + str(TARGET):>6} {first['compiled']:>6} {first['compiled_kept']:>6}"
                  f"   {step['forward']}, {step['forward_packed']}, {step['forward_compiled']}, "
                  f"{step['forward_compiled_frozen']}, {step['matrix_products']}, "
                  f"{step['matrix_products_packed']}, {step['packing']}, {step['draw']}; {step['packed_mib']}")
    for r in runs:
        if "lora" in r:
            lora = r["lora"]
            print(f"{r['model']} with LoRA, {lora['autocast']} autocast, CPU s per rollout: base weights kept "
                  f"{lora['cpu_s_per_rollout']['base_kept']}, every weight packed at every call "
                  f"{lora['cpu_s_per_rollout']['all_packed']} (saves {lora['saved_ms_per_rollout']} ms a rollout; "
                  f"{lora['kept_mib']} MiB kept)")
    print("tokens/s per side; ratio: ÷ generate's tokens/s, median of interleaved rounds, wall clock (CPU seconds); "
          "engine: plain matrix products; packed: packed weights, trainable, so packed again at every call (what "
          "an RL rollout with full fine-tuning gets); kept: packed weights, frozen, packed at the first call and "
          "reused (rlhfkit generate, evaluation, LoRA's base weights); compiled: the decode step compiled, weights "
          "as the graph's inputs; compiled_kept: compiled on the frozen copy, weights folded in; compile s: the "
          "compiled sides' first calls")
    result = {"runs": runs, "target_ratio": TARGET, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__, **B.contention()}
    out = Path(__file__).parent / "results" / f"generation_speed-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"other processes' CPU during the run: {result['other_cpu_s']} s -> {out}")


if __name__ == "__main__":
    main()
