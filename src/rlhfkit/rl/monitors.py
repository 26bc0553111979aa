"""Reward-hacking monitors: signs during training that the policy pleases the reward without getting
better.

Every step, :meth:`RewardHackingMonitor.measure` scores the rollout's completions with an independent
judge (not the training reward) and measures their diversity; :meth:`check` then compares the latest
``window`` steps with the first ``window`` (the baseline) and warns when

- hacking:   the reward rose by at least ``reward_rise`` baseline standard deviations while the judge
             rose by less than ``judge_fraction`` of that (in its own standard deviations);
- kl:        the KL to the reference exceeds ``max_kl`` nats per sequence;
- length:    the mean response length left [baseline / length_ratio, baseline · length_ratio];
- diversity: distinct-2 of the completions fell below ``min_diversity_ratio`` · baseline.

A warning is printed once when it starts, kept in :attr:`events`, and stops training if its kind is in
``stop_on``. ``check`` reads only the trainer's history, so a resumed run monitors the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rlhfkit.console import console
from rlhfkit.eval.metrics import distinct_n
from rlhfkit.reward.base import RewardFn

KINDS = ("hacking", "kl", "length", "diversity")


@dataclass
class MonitorConfig:
    window: int = 5  # steps averaged for the baseline and for the latest value
    reward_rise: float = 0.5  # baseline reward std units
    judge_fraction: float = 0.25
    max_kl: float = 15.0
    length_ratio: float = 2.0
    min_diversity_ratio: float = 0.5
    stop_on: tuple[str, ...] = ()  # warning kinds that stop training (from KINDS)

    def __post_init__(self) -> None:
        unknown = set(self.stop_on) - set(KINDS)
        if unknown:
            raise ValueError(f"stop_on: unknown kinds {sorted(unknown)}; choose from {list(KINDS)}")


@dataclass
class RewardHackingMonitor:
    judge: RewardFn
    config: MonitorConfig = field(default_factory=MonitorConfig)
    events: list[dict] = field(default_factory=list)

    def measure(self, prompts: Sequence[str], completions: Sequence[str], scores) -> dict[str, float]:
        """This step's judge score and diversity (added to the step's stats)."""
        judged = self.judge(list(prompts), list(completions)).float()
        return {"monitor/judge": judged.mean().item(), "monitor/judge_std": judged.std().item(),
                "monitor/distinct_2": distinct_n(completions, 2), "reward/score_std": scores.float().std().item()}

    def check(self, history: Sequence[dict[str, float]]) -> str | None:
        """Warn about what the history shows; returns a reason to stop, or None."""
        w = self.config.window
        if len(history) < 2 * w:
            return None

        def mean(key: str, rows: Sequence[dict]) -> float:
            return sum(r[key] for r in rows) / len(rows)

        base, last, cfg = history[:w], history[-w:], self.config
        step = int(history[-1]["step"])
        reward_gain = (mean("reward/score", last) - mean("reward/score", base)) / max(
            mean("reward/score_std", base), 1e-6)
        judge_gain = (mean("monitor/judge", last) - mean("monitor/judge", base)) / max(
            mean("monitor/judge_std", base), 1e-6)
        length, base_length = mean("response/length", last), mean("response/length", base)
        diversity, base_diversity = mean("monitor/distinct_2", last), mean("monitor/distinct_2", base)
        alarms = {
            "hacking": (reward_gain >= cfg.reward_rise and judge_gain < cfg.judge_fraction * reward_gain,
                        f"reward rose {reward_gain:+.2f} std but the independent judge only {judge_gain:+.2f} std"),
            "kl": (history[-1]["kl/kl"] > cfg.max_kl, f"KL to the reference {history[-1]['kl/kl']:.1f} > {cfg.max_kl}"),
            "length": (not base_length / cfg.length_ratio <= length <= base_length * cfg.length_ratio,
                       f"mean length {length:.1f} tokens vs {base_length:.1f} at the start"),
            "diversity": (diversity < cfg.min_diversity_ratio * base_diversity,
                          f"distinct-2 {diversity:.3f} vs {base_diversity:.3f} at the start"),
        }
        active = {e["kind"] for e in self.events if e["active"]}
        for kind, (raised, message) in alarms.items():
            if raised and kind not in active:
                self.events.append({"step": step, "kind": kind, "message": message, "active": True})
                console.print(f"[bold yellow]warning (step {step}, {kind}):[/] {message}")
            elif not raised and kind in active:
                for event in self.events:
                    if event["kind"] == kind and event["active"]:
                        event["active"] = False
                        event["cleared_at"] = step
        for kind in cfg.stop_on:
            if alarms[kind][0]:
                return f"monitor: {alarms[kind][1]}"
        return None
