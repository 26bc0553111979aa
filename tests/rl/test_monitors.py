import pytest
import torch

from rlhfkit.reward.base import FunctionReward
from rlhfkit.rl.monitors import MonitorConfig, RewardHackingMonitor

JUDGE = FunctionReward(lambda p, c: float("kind" in c))
RELEVANCE = FunctionReward(lambda p, c: float(p.split()[-1] in c))


def steps(n, reward=lambda i: 0.0, judge=lambda i: 0.5, kl=lambda i: 1.0, relevance=lambda i: 0.6,
          template=lambda i: 0.1, length=10.0, distinct=0.8):
    """A history of n steps; reward, judge, kl, relevance and template share are functions of the step index."""
    return [{"step": i + 1, "reward/score": reward(i), "reward/score_std": 1.0, "monitor/judge": judge(i),
             "monitor/judge_std": 0.2, "kl/kl": kl(i), "response/length": length, "monitor/distinct_2": distinct,
             "monitor/relevance": relevance(i), "monitor/relevance_std": 0.2, "monitor/template_share": template(i),
             "monitor/answers": 32.0}
            for i in range(n)]


def warned(history, **config):
    monitor = RewardHackingMonitor(JUDGE, MonitorConfig(**config))
    for end in range(1, len(history) + 1):  # as the trainer calls it: after every step
        monitor.check(history[:end])
    return [e["kind"] for e in monitor.events]


def test_measure_scores_rollouts_with_the_judges_and_a_batch_of_one_has_zero_std():
    monitor = RewardHackingMonitor(JUDGE, relevance=RELEVANCE, logged={"gold": JUDGE})
    stats = monitor.measure(["about cats", "about cats"], ["so kind", "rude cats"], torch.tensor([1.0, 3.0]))
    assert stats["monitor/judge"] == 0.5 and stats["reward/score_std"] == pytest.approx(2**0.5)
    assert stats["monitor/distinct_2"] == 1.0 and stats["monitor/relevance"] == 0.5 and stats["judge/gold"] == 0.5
    single = monitor.measure(["about cats"], ["so kind"], torch.tensor([1.0]))
    assert single["reward/score_std"] == 0.0 and single["monitor/judge_std"] == 0.0


def test_a_benign_run_does_not_warn():
    """Reward and judge rise together, relevance and KL wobble within bounds, answers stay varied."""
    history = steps(30, reward=lambda i: 0.1 * i, judge=lambda i: 0.5 + 0.03 * i, kl=lambda i: 1 + 0.2 * i % 3,
                    relevance=lambda i: 0.6 + 0.02 * (-1) ** i, template=lambda i: 0.1 + 0.05 * (i % 3))
    assert warned(history, window=5) == []


def test_rising_reward_with_falling_relevance_warns_and_can_stop():
    history = steps(12, reward=lambda i: 0.2 * i, judge=lambda i: 0.5 + 0.05 * i, relevance=lambda i: 0.6 - 0.04 * i)
    assert warned(history, window=3) == ["relevance"]
    noisy_start = steps(3, relevance=lambda i: 0.39 if i < 2 else 0.28)  # one batch of 32 lower: noise, z < 3
    assert warned(noisy_start, window=5) == []
    monitor = RewardHackingMonitor(JUDGE, MonitorConfig(window=3, stop_on=("relevance",)))
    assert "relevance to the request fell" in monitor.check(history)


def test_one_spread_out_batch_at_step_two_is_no_relevance_alarm():
    """The toy demo's seed 4 (KL 0.02 at step 2): 0.541 (s 0.181) then 0.384 (s 0.290), 32 answers each. By the
    baseline's s alone that was z = 3.5 and stopped PPO; with both steps' s it is z = 2.6."""
    history = steps(2, relevance=lambda i: (0.5408, 0.3841)[i])
    history[1]["monitor/relevance_std"] = 0.2904
    history[0]["monitor/relevance_std"] = 0.1808
    assert warned(history, window=5) == []
    raised, message = RewardHackingMonitor(JUDGE, MonitorConfig(min_z=2.5)).alarms(history)["relevance"]
    assert raised and "z = 2.6" in message



def test_a_batch_of_one_beside_measured_batches_is_no_relevance_alarm_from_its_zero_std():
    """A step of one answer has no spread measured (std 0 by convention, not a spread of 0). Beside batches of 32
    (a run resumed at batch size 1), one answer 0.15 lower is 0.75 of one answer's s (z = 0.7), and five answers
    0.07 lower z = 0.8: no alarm. Read as a variance of 0, they were z = 4.2 and 4.4 and stopped the run."""
    one = steps(2, relevance=lambda i: (0.6, 0.45)[i])
    one[1] |= {"monitor/answers": 1.0, "monitor/relevance_std": 0.0}
    raised, message = RewardHackingMonitor(JUDGE).alarms(one)["relevance"]
    assert not raised and "(0.75 std, z = 0.7)" in message  # se = √(0.2²/32 + 0.2²/1), the baseline's s for both
    five = steps(10, relevance=lambda i: 0.6 if i < 5 else 0.53)
    for row in five[5:]:
        row |= {"monitor/answers": 1.0, "monitor/relevance_std": 0.0}
    assert warned(five, window=5) == []
    all_ones = [row | {"monitor/answers": 1.0, "monitor/relevance_std": 0.0}
                for row in steps(4, relevance=lambda i: 0.6 if i < 2 else 0.5)]
    assert warned(all_ones, window=2) == ["relevance"]  # no spread measured anywhere: still armed

def test_rising_reward_with_a_flat_judge_warns_once_and_can_stop():
    monitor = RewardHackingMonitor(JUDGE, MonitorConfig(window=3, stop_on=("hacking",)))
    history = steps(12, reward=lambda i: 0.2 * i)
    reason = monitor.check(history)
    assert reason and "independent judge" in reason
    assert [e["kind"] for e in monitor.events] == ["hacking"]
    monitor.check(history)
    assert len(monitor.events) == 1  # still active: not repeated


def test_a_kl_spike_in_the_first_steps_warns_at_once():
    history = steps(3, kl=lambda i: 40.0 if i == 1 else 1.0)
    monitor = RewardHackingMonitor(JUDGE, MonitorConfig(window=10, stop_on=("kl_spike",)))
    assert monitor.check(history[:1]) is None
    assert "at one step" in monitor.check(history[:2])
    assert (2, "kl_spike") in [(e["step"], e["kind"]) for e in monitor.events]


def test_kl_is_judged_over_a_window_not_only_the_last_step():
    high_then_low = steps(8, kl=lambda i: 25.0 if i < 7 else 2.0)  # last step fine, the window is not
    assert warned(high_then_low, window=4) == ["kl"]
    one_blip = steps(8, kl=lambda i: 25.0 if i == 4 else 2.0)  # under the spike limit, averaged away
    assert warned(one_blip, window=4) == []


def test_half_the_answers_on_one_template_warns_of_partial_collapse():
    history = steps(6, template=lambda i: 0.5)
    assert warned(history, window=3) == ["collapse"]


def test_a_batch_of_one_keeps_the_alarms_armed():
    """One sample per step: its std is 0 (was NaN, which made every comparison False)."""
    history = [row | {"reward/score_std": 0.0, "monitor/judge_std": float("nan")}
               for row in steps(6, reward=lambda i: 0.5 * i)]
    assert warned(history, window=2) == ["hacking"]


@pytest.mark.parametrize(("kind", "change"), [("length", {"response/length": 40.0}),
                                              ("diversity", {"monitor/distinct_2": 0.1})])
def test_length_and_diversity_runaways_warn(kind, change):
    history = steps(6)
    history[-3:] = [row | change for row in history[-3:]]
    assert warned(history, window=3) == [kind]


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
    assert "hacking" in [e["kind"] for e in monitor.events]
    assert {"monitor/judge", "monitor/distinct_2", "monitor/template_share"} <= set(history[-1])


def test_a_run_resumed_with_a_monitor_newly_given_reads_the_steps_it_measured():
    """Steps before the monitor (or its relevance judge) was given carry none of its numbers: no KeyError, and
    the alarms compare the steps that measured them."""
    unmonitored = [{"step": i + 1, "reward/score": 0.0, "kl/kl": 1.0, "response/length": 10.0} for i in range(3)]
    falling = steps(6, relevance=lambda i: 0.6 - 0.1 * i)
    for row in falling:
        row["step"] += 3
    assert warned(unmonitored + falling, window=3) == ["relevance"]
    assert warned(unmonitored + steps(6), window=3) == []
    judged_only = [{k: v for k, v in row.items() if not k.startswith("monitor/relevance")} for row in steps(3)]
    assert warned(judged_only + falling, window=3) == ["relevance"]


def test_answers_to_one_prompt_are_one_draw_for_the_relevance_alarm():
    """GRPO's batches: G answers to each prompt share its topic. 4 prompts × 8 answers a step, relevance 0.6 then
    0.44 (s 0.2 per prompt mean): counted as 32 answers a step it was z = 3.2 and an alarm; as 4 prompts, z = 1.1."""
    history = steps(2, relevance=lambda i: (0.6, 0.44)[i])
    for row in history:
        row |= {"monitor/prompts": 4.0, "monitor/relevance_prompt_std": 0.2}
    as_answers = [{k: v for k, v in row.items() if k not in ("monitor/prompts", "monitor/relevance_prompt_std")}
                  for row in history]  # also how a history logged before prompts were counted is read
    assert RewardHackingMonitor(JUDGE).alarms(as_answers)["relevance"] == (
        True, "relevance to the request fell 0.440 vs 0.600 at the start (0.80 std, z = 3.2)")
    raised, message = RewardHackingMonitor(JUDGE, MonitorConfig(min_prompts=1)).alarms(history)["relevance"]
    assert not raised and "z = 1.1" in message
    monitor = RewardHackingMonitor(JUDGE, relevance=RELEVANCE)
    stats = monitor.measure(["about cats"] * 3 + ["about dogs"] * 3, ["cats"] * 3 + ["dogs", "no", "no"],
                            torch.zeros(6))
    assert stats["monitor/prompts"] == 2.0 and stats["monitor/answers"] == 6.0
    assert stats["monitor/relevance_prompt_std"] == pytest.approx(torch.tensor([1.0, 1 / 3]).std().item())


def test_a_relevance_drop_is_judged_once_each_side_holds_enough_prompts_or_a_full_window():
    """2 prompts a step (GRPO 2 × 4): one step a side is too few prompts to judge a fall however large; four steps
    a side (8 prompts) are judged; so is a full window of steps, at any batch size."""
    falling = steps(8, relevance=lambda i: 0.6 if i < 4 else 0.3)
    for row in falling:
        row |= {"monitor/prompts": 2.0, "monitor/relevance_prompt_std": 0.05}
    assert not RewardHackingMonitor(JUDGE).alarms(falling[3:5])["relevance"][0]
    assert RewardHackingMonitor(JUDGE, MonitorConfig(min_prompts=2)).alarms(falling[3:5])["relevance"][0]
    assert warned(falling, window=5) == ["relevance"]
    assert RewardHackingMonitor(JUDGE, MonitorConfig(window=1)).alarms(falling[3:5])["relevance"][0]


def test_conversations_are_grouped_by_prompt_for_the_relevance_alarm():
    from rlhfkit.data.records import Message

    monitor = RewardHackingMonitor(JUDGE, relevance=FunctionReward(lambda p, c: float("cats" in c)))
    chat = [Message(role="user", content="about cats")]
    stats = monitor.measure([chat, chat, "about dogs"], ["cats", "cats", "no"], torch.zeros(3))
    assert stats["monitor/prompts"] == 2.0 and stats["monitor/relevance_prompt_std"] == pytest.approx(2**-0.5)


def test_steps_of_one_prompt_each_are_judged_by_the_spread_between_steps():
    """GRPO with one group a step (group_size = the batch): every step one prompt, so no step measures a spread
    between prompts. Read as a spread of 0 (z ~ 10⁵), prompts that happened to be less relevant than the first
    five stopped an unchanged policy in 80% of simulated runs; the steps' means are the draws (z = 1.0)."""
    prompts = [0.7, 0.4, 0.6, 0.3, 0.8, 0.5, 0.35, 0.6, 0.25, 0.55]  # one prompt's mean relevance a step
    history = steps(10, relevance=lambda i: prompts[i])
    for row in history:
        row |= {"monitor/answers": 4.0, "monitor/relevance_std": 0.15, "monitor/prompts": 1.0,
                "monitor/relevance_prompt_std": 0.0}
    raised, message = RewardHackingMonitor(JUDGE).alarms(history)["relevance"]
    assert not raised and "z = 1.0" in message
    assert warned(history, window=5) == []
    falling = steps(10, relevance=lambda i: prompts[i] - (0.3 if i >= 5 else 0.0))
    for row in falling:
        row |= {"monitor/answers": 4.0, "monitor/relevance_std": 0.15, "monitor/prompts": 1.0,
                "monitor/relevance_prompt_std": 0.0}
    assert warned(falling, window=5) == ["relevance"]


@pytest.mark.parametrize(("field", "value"), [("window", 0), ("window", -1), ("min_prompts", -1)])
def test_a_window_under_one_or_negative_min_prompts_is_refused_naming_the_field(field, value):
    """window 0 divided by zero at the second step (a traceback from the monitor, mid-training)."""
    with pytest.raises(ValueError, match=f"^{field}: "):
        MonitorConfig(**{field: value})
    assert MonitorConfig(min_prompts=0).min_prompts == 0  # judged from the first steps: allowed


def test_processes_pool_their_relevance_spreads_as_one_batch():
    """What the trainer does in DDP (sum COUNTS, average the rest): two processes of one prompt each (GRPO, a group
    of 2 a process) had relevance_prompt_std 0, the mean of their stds, and read as 2 prompts with a spread of 0.
    Pooled, both stds are those of the two processes' answers as one batch."""
    from rlhfkit.rl.monitors import pooled_spreads
    from rlhfkit.rl.trainer import OnPolicyTrainer

    monitor = RewardHackingMonitor(JUDGE, relevance=RELEVANCE)
    ranks = [monitor.measure(["about cats"] * 2, ["cats", "cats"], torch.zeros(2)),
             monitor.measure(["about dogs"] * 2, ["dogs", "no"], torch.zeros(2))]
    reduced = {k: sum(r[k] for r in ranks) / 2 * (2 if k in OnPolicyTrainer.COUNTS else 1) for k in ranks[0]}
    assert reduced["monitor/relevance_prompt_std"] == 0.0 and reduced["monitor/prompts"] == 2.0  # averaged: 0
    pooled = pooled_spreads(reduced, pooled=True)
    whole = monitor.measure(["about cats"] * 2 + ["about dogs"] * 2, ["cats", "cats", "dogs", "no"], torch.zeros(4))
    for key in ("monitor/relevance_prompt_std", "monitor/relevance_std", "monitor/prompts", "monitor/answers"):
        assert pooled[key] == pytest.approx(whole[key])
    assert pooled["monitor/relevance_prompt_std"] == pytest.approx(0.5 / 2**0.5)
    assert set(pooled_spreads(whole, pooled=False)) == set(pooled) == {k for k in whole if not k.endswith("sumsq")
                                                                       and not k.endswith(".sum")}


def test_a_judge_that_gives_nan_stops_the_run_at_its_step_instead_of_silencing_the_alarms(tmp_path):
    """A NaN relevance made the step's mean NaN, and every comparison with it False: no relevance alarm for a
    window of steps, silently. Now the judge's contract is checked like a reward's, and the run stops naming it."""
    from conftest import build_tiny_causal, word_tokenizer
    from rlhfkit.reward.base import RewardError
    from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

    broken = FunctionReward(lambda p, c: float("nan") if p == "fix bike" else 0.5, name="relevance")
    with pytest.raises(RewardError, match=r"reward 'relevance' gave nan for completion 1 of 2 \(prompt 'fix bike'"):
        RewardHackingMonitor(JUDGE, relevance=broken).measure(["help me", "fix bike"], ["a", "b"], torch.zeros(2))
    for monitor in (RewardHackingMonitor(JUDGE, relevance=broken), RewardHackingMonitor(broken),
                    RewardHackingMonitor(JUDGE, logged={"gold": broken})):
        config = PPOConfig(steps=3, batch_size=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=4,
                           output_dir=str(tmp_path))
        trainer = PPOTrainer(config, build_tiny_causal(), word_tokenizer(), FunctionReward(lambda p, c: 0.0),
                             ["help me", "fix bike"], monitor=monitor)
        with pytest.raises(RewardError, match=r"^ppo stopped at step 1: reward 'relevance' gave nan"):
            trainer.train()
        assert not (tmp_path / "policy").exists()
