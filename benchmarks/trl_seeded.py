"""Run one of ../shared/bench's TRL runners with another training seed (run it with TRL's Python).

The runners hard-code ``seed=data_seed=workload.SEED`` in their TrainingArguments; this replaces both
with SEED and leaves everything else (initial weights, data, hyper-parameters) as the workload defines
it. With TRL the seed moves the order of the pairs/prompts (the sampler) and the sampling of completions.

    ~/.cache/rlhf-bench/venv-trl/bin/python benchmarks/trl_seeded.py SEED ../shared/bench/run_dpo.py [ARGS]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} SEED RUNNER.py [ARGS...]")
    seed, runner = int(sys.argv[1]), Path(sys.argv[2]).resolve()
    sys.argv = [str(runner), *sys.argv[3:]]
    sys.path.insert(0, str(runner.parent))
    import trl_common

    shared_kwargs = trl_common.common_training_kwargs

    def seeded_kwargs(*args, **kwargs) -> dict:
        return shared_kwargs(*args, **kwargs) | {"seed": seed, "data_seed": seed}

    trl_common.common_training_kwargs = seeded_kwargs  # the runners import it from the module afterwards
    runpy.run_path(str(runner), run_name="__main__")


if __name__ == "__main__":
    main()
