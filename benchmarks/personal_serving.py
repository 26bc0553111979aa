"""Personal serving: the time of one answer as more users' adapters are loaded in the process.

The personal demo's toy base (`rlhfkit demo --preset personal`'s, trained once and cached) in a
``PersonalModels``, with 1, then 100, then 400 LoRA adapters loaded (fresh ones, rank 8, as each user's).
For each count: the median time of one 40-token answer to one question from the first user's adapter and
from the base model (every adapter disabled), and of switching to each alone (``PersonalModels.active``),
one torch thread. peft switches adapters layer by layer over every adapter loaded, so both grow with the
count; ``--max-in-memory`` of `rlhfkit personal serve` bounds it.
Writes benchmarks/results/personal_serving-<time>.json.

    python benchmarks/personal_serving.py [--counts 1 100 400] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from rlhfkit.demo.personal import PersonalDemoConfig
from rlhfkit.demo.presets import DemoConfig, load_demo_policy
from rlhfkit.personal.models import PersonalModels, user_owner

QUESTION = "Any tips for sleeping better?"


def median_ms(work, repeats: int) -> float:
    work(0)  # untimed: the first call packs the frozen weights it keeps
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        work(i)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 100, 400])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = PersonalDemoConfig()
    policy, tokenizer, _ = load_demo_policy(DemoConfig(preset="toy", toy_policy=config.toy_policy), progress=False)
    models = PersonalModels(policy, tokenizer, tempfile.mkdtemp(), use_chat_template=True)
    names, rows = [], []
    for count in sorted(args.counts):
        while len(names) < count:
            names.append(models.new_adapter(f"{user_owner(len(names))}-v1", None))
        row = {"adapters_loaded": count}
        for side, adapter in (("adapter", names[0]), ("base", None)):
            row[f"answer_ms_{side}"] = median_ms(
                lambda i, a=adapter: models.answer(QUESTION, a, config.temperature, config.max_new_tokens, seed=i),
                args.repeats)

            def switch(_, a=adapter):
                with models.active(a):
                    pass

            row[f"switch_ms_{side}"] = median_ms(switch, args.repeats)
        rows.append(row)
        print(f"{count:4d} adapters loaded: answer {row['answer_ms_adapter']:.1f} ms from an adapter "
              f"(switch {row['switch_ms_adapter']:.1f} ms), {row['answer_ms_base']:.1f} ms from the base "
              f"(switch {row['switch_ms_base']:.1f} ms)", flush=True)
    out = Path(__file__).parent / "results" / f"personal_serving-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"threads": 1, "max_new_tokens": config.max_new_tokens, "rows": rows}, indent=1))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
