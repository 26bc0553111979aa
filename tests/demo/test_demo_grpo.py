"""The toy demo with GRPO, tiny: its stage folder is seed-N/grpo, a crash after its checkpoint resumes from it to
the same history, and a rerun of the folder with another algorithm is refused in one line."""

import os
import shutil

import pytest

from conftest import invoke
from rlhfkit.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_a_toy_grpo_run_resumes_from_its_checkpoint_and_refuses_another_algorithm(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    settings = dict(label_prompts=4, eval_prompts=4, n=2, ppo_steps=11, ppo_batch_size=4, ppo_minibatch_size=4,
                    max_new_tokens=8, seeds=(0,), eval_seeds=(0,), eval_samples=1, group_size=2, reward_epochs=1,
                    monitor_stop_on=())  # 11 steps whatever the monitor says: a checkpoint at 10 to resume from
    config = DemoConfig.preset_defaults("toy", run_dir=tmp_path / "run", algorithm="grpo", **settings)
    summary = run_demo(config, progress=False)
    seed = tmp_path / "run" / "seed-0"
    assert summary["per_seed"][0]["ppo_steps"] == 11 and not (seed / "ppo").exists()
    assert (seed / "grpo" / "checkpoint-10").is_dir() and (seed / "grpo" / "policy").is_dir()
    import json

    first = json.loads((seed / "grpo" / "policy" / "history.json").read_text())["history"]
    assert all(row["monitor/answers"] == 4.0 and row["monitor/prompts"] == 2.0 for row in first)
    # a crash after the checkpoint at step 10: no policy, no after samples
    shutil.rmtree(seed / "grpo" / "policy")
    (seed / "after.jsonl").unlink()
    resumed = run_demo(config, progress=False)
    again = json.loads((seed / "grpo" / "policy" / "history.json").read_text())["history"]
    assert resumed["per_seed"][0]["ppo_steps"] == 11 and len(again) == 11

    def numbers(rows):
        return [{k: round(v, 4) for k, v in r.items() if k != "time/step_s"} for r in rows]

    assert numbers(again) == numbers(first)
    # the same folder with another algorithm: one line, nothing reused or written
    before = sorted(p.name for p in seed.iterdir())
    for algorithm in ("ppo", "rloo"):
        with pytest.raises(ValueError, match=r"other settings \(algorithm differ"):
            run_demo(DemoConfig.preset_defaults("toy", run_dir=tmp_path / "run", algorithm=algorithm, **settings),
                     progress=False)
    result = invoke("demo", "--run-dir", tmp_path / "run", "--algorithm", "ppo", "--seeds", 1)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "differ" in lines[0]
    assert sorted(p.name for p in seed.iterdir()) == before
    assert os.environ["RLHFKIT_CACHE"] == str(tmp_path / "cache")
