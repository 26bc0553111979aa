import pytest
import torch

from rlhfkit.reward.base import FunctionReward
from rlhfkit.rl.monitors import MonitorConfig, RewardHackingMonitor

JUDGE = FunctionReward(lambda p, c: float("kind" in c))


def steps(n, reward, judge, kl=1.0, length=10.0, distinct=0.8):
    """A history of n steps; reward and judge are functions of the step index."""
    return [{"step": i + 1, "reward/score": reward(i), "reward/score_std": 1.0, "monitor/judge": judge(i),
             "monitor/judge_std": 0.2, "kl/kl": kl, "response/length": length, "monitor/distinct_2": distinct}
            for i in range(n)]


def test_measure_scores_rollouts_with_the_independent_judge():
    monitor = RewardHackingMonitor(JUDGE)
    stats = monitor.measure(["p", "p"], ["so kind", "rude words"], torch.tensor([1.0, 3.0]))
    assert stats["monitor/judge"] == 0.5 and stats["reward/score_std"] == pytest.approx(2**0.5)
    assert stats["monitor/distinct_2"] == 1.0


def test_rising_reward_with_a_flat_judge_warns_once_and_can_stop():
    monitor = RewardHackingMonitor(JUDGE, MonitorConfig(window=3, stop_on=("hacking",)))
    history = steps(12, reward=lambda i: 0.2 * i, judge=lambda i: 0.5)
    assert monitor.check(history[:5]) is None  # not enough steps yet
    reason = monitor.check(history)
    assert reason and "independent judge" in reason
    assert [e["kind"] for e in monitor.events] == ["hacking"]
    monitor.check(history)
    assert len(monitor.events) == 1  # still active: not repeated


def test_reward_and_judge_rising_together_is_fine():
    monitor = RewardHackingMonitor(JUDGE, MonitorConfig(window=3, stop_on=("hacking",)))
    assert monitor.check(steps(12, reward=lambda i: 0.2 * i, judge=lambda i: 0.5 + 0.05 * i)) is None
    assert monitor.events == []


@pytest.mark.parametrize(("kind", "change"), [("kl", {"kl/kl": 50.0}), ("length", {"response/length": 40.0}),
                                              ("diversity", {"monitor/distinct_2": 0.1})])
def test_kl_length_and_diversity_runaways_warn(kind, change):
    monitor = RewardHackingMonitor(JUDGE, MonitorConfig(window=2))
    history = steps(6, reward=lambda i: 0.0, judge=lambda i: 0.5)
    history[-2:] = [row | change for row in history[-2:]]
    assert monitor.check(history) is None  # warn only
    assert [e["kind"] for e in monitor.events] == [kind]


def test_unknown_stop_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown kinds"):
        MonitorConfig(stop_on=("everything",))


def test_monitor_in_training_stops_a_run_that_hacks_the_reward(tmp_path):
    """The reward pays for 'kind' words; the independent judge only for the word 'thanks', which the
    policy has no reason to say more: reward rises, judge stays flat, the monitor stops the run."""
    from conftest import build_tiny_causal, word_tokenizer
    from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

    reward = FunctionReward(lambda p, c: sum(w in {"happy", "kind", "nice", "good"} for w in c.split()) / 8)
    judge = FunctionReward(lambda p, c: float("thanks" in c.split()))
    monitor = RewardHackingMonitor(judge, MonitorConfig(window=3, stop_on=("hacking",)))
    config = PPOConfig(steps=40, batch_size=16, minibatch_size=8, ppo_epochs=2, lr=3e-3, max_new_tokens=8,
                       kl_coef=0.05, lam=1.0, output_dir=str(tmp_path))
    trainer = PPOTrainer(config, build_tiny_causal(), word_tokenizer(), reward, ["help me", "plan day", "fix bike"],
                         monitor=monitor)
    history = trainer.train()
    assert len(history) < 40 and trainer.stop_reason.startswith("monitor:")
    assert monitor.events[0]["kind"] == "hacking"
    assert {"monitor/judge", "monitor/distinct_2"} <= set(history[-1])
