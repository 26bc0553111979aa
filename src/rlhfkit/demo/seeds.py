"""Claims across training seeds.

Each training seed relabels, retrains the reward model and reruns PPO; all seeds are evaluated on the
same held-out prompts against the same "before" samples. The pooled change of a judge is the per-prompt
mean over seeds of after − before, with the cluster interval over prompts (eval/metrics.py); the
seed-to-seed spread is shown in the per-seed table. A pooled verdict is "improved" only when every
seed moved in the judge's good direction *and* the pooled interval excludes zero on that side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from scipy.stats import binomtest

from rlhfkit.eval.metrics import Comparison

DIVERSITY_KEPT = 0.9  # the demo's bar: distinct-2 after ≥ 0.9 × before


@dataclass
class SeedResult:
    """One training seed's run: its comparisons on the held-out prompts (judges, proxy, distinct-2, KL)
    and what training did."""

    seed: int
    comparisons: dict[str, Comparison]
    proxy: Comparison  # the seed's own reward model on the same samples
    reward_model_accuracy: float
    reward_model_pairs: int
    pairs: int
    ppo_steps: int
    stop_reason: str
    history: list[dict] = field(default_factory=list)
    monitor_events: list[dict] = field(default_factory=list)

    def row(self) -> dict:
        """The per-seed table's row."""
        return {"seed": self.seed, **{f"{k}_difference": c.difference for k, c in self.comparisons.items()},
                "proxy_difference": self.proxy.difference, "gold_win_rate": self.comparisons["gold"].win_rate,
                "kl": self.comparisons["kl"].after, "distinct_2_ratio": distinct_ratio(self.comparisons["distinct_2"]),
                "reward_model_accuracy": self.reward_model_accuracy, "ppo_steps": self.ppo_steps,
                "stop_reason": self.stop_reason, "monitor_warnings": len(self.monitor_events)}


def distinct_ratio(c: Comparison) -> float:
    return c.after / c.before if c.before else float("nan")


def pooled_verdict(per_seed: Sequence[Comparison], pooled: Comparison) -> str:
    """improved / worse only when every seed agrees in direction and the pooled interval excludes zero;
    "seeds disagree" when they do not; else "no clear change". Too few prompts keep the pooled
    verdict's "unreliable" note (so "improved" alone is never said of them)."""
    good = [(c.difference > 0) == c.higher_is_better and c.difference != 0 for c in per_seed]
    bad = [(c.difference < 0) == c.higher_is_better and c.difference != 0 for c in per_seed]
    if pooled.significant and all(good) and pooled.verdict.startswith("improved"):
        verdict = "improved"
    elif pooled.significant and all(bad) and pooled.verdict.startswith("worse"):
        verdict = "worse"
    else:
        verdict = "seeds disagree" if any(good) and any(bad) else "no clear change"
    return verdict + pooled.caveat


def accuracy_interval(accuracy: float, pairs: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of a pairwise accuracy measured on ``pairs`` held-out pairs (pairs of one prompt
    are not independent, so read it as a lower bound on the uncertainty)."""
    if not pairs:
        return float("nan"), float("nan")
    ci = binomtest(round(accuracy * pairs), pairs).proportion_ci(confidence, method="wilson")
    return ci.low, ci.high


def honest_criteria(pooled: dict[str, Comparison], verdicts: dict[str, str],
                    per_seed: Sequence[dict[str, Comparison]]) -> dict[str, bool]:
    """The demo's bar, each named, held by the pooled result *and* every training seed (as the gold
    verdict is): the labelers' criterion (gold) improved on every seed with the pooled interval above
    zero; relevance not worse (its interval includes zero or is positive); distinct-2 kept at
    ≥ 0.9 × before. A NaN fails every comparison."""
    return {"gold improved": verdicts["gold"] == "improved",
            "relevance not worse (pooled, every seed)": all(c["relevance"].ci_high >= 0 for c in [pooled, *per_seed]),
            f"distinct-2 ≥ {DIVERSITY_KEPT} × before (pooled, every seed)":
                all(distinct_ratio(c["distinct_2"]) >= DIVERSITY_KEPT for c in [pooled, *per_seed])}
