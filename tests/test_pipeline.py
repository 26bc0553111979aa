import pytest

from rlhfkit.data.io import read_records
from rlhfkit.data.records import Completion, PreferencePair, Ranking
from rlhfkit.pipeline import DemoConfig, run_demo, spearman


def test_spearman_of_monotone_and_reversed_scores():
    import torch

    x = torch.tensor([0.1, 0.5, 0.3, 2.0])
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


@pytest.mark.slow
def test_demo_runs_end_to_end_offline_and_resumes(tmp_path):
    """A shortened `rlhfkit demo` with the real SmolLM2 policy and MiniLM reward model."""
    config = DemoConfig(run_dir=tmp_path / "run", prompts=6, n=3, max_new_tokens=12, batch_size=6,
                        reward_epochs=1)
    summary = run_demo(config, progress=False)
    run = tmp_path / "run"
    completions = read_records(run / "completions.jsonl", Completion)
    assert len(completions) == 18 and summary["completions"] == 18
    assert len(read_records(run / "rankings.jsonl", Ranking)) == 6 * 4  # every labeler ranks every prompt
    assert len(read_records(run / "pairs.jsonl", PreferencePair)) == summary["pairs"] > 0
    assert 0.0 <= summary["reward_model_held_out_accuracy"] <= 1.0
    assert (run / "reward_model" / "model.safetensors").exists() and (run / "summary.yaml").exists()
    assert all("reward_model" in c.scores for c in read_records(run / "scored.jsonl", Completion))

    before = (run / "completions.jsonl").stat().st_mtime_ns
    again = run_demo(config, progress=False)
    assert (run / "completions.jsonl").stat().st_mtime_ns == before  # nothing regenerated
    assert again["reward_model_held_out_accuracy"] == summary["reward_model_held_out_accuracy"]  # reused
