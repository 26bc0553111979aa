"""How much labelers agree, and which labelers to distrust.

Every statistic reads rankings of the same items (one item = one prompt's completions) by several
labelers. A ranking's groups give each completion a rank position: the mean position of its tie group
(1 = best), e.g. groups [[a], [b, c], [d]] → a: 1, b: 2.5, c: 2.5, d: 4.

- Pairwise agreement rate: over every item, every two labelers of it and every two completions that
  both labelers ordered strictly, the share on which they chose the same one.
- Krippendorff's α (ordinal): units are completions, coders are labelers, values are rank positions.
      α = 1 − D_o / D_e,    D_o = Σ_ck o_ck δ²_ck / n,    D_e = Σ_ck n_c n_k δ²_ck / (n (n − 1)),
  with o the coincidence matrix of values within units, n_c its marginals, n = Σ n_c, and the ordinal
  distance δ²_ck = (Σ_{g=c..k} n_g − (n_c + n_k) / 2)². 1 = perfect agreement, 0 = chance level.
- Kendall's W per item (m labelers, n completions, R_i = sum of completion i's ranks):
      W = 12 S / (m² (n³ − n) − m T),    S = Σ_i (R_i − R̄)²,    T = Σ_labelers Σ_ties (t³ − t).
- Each labeler's Kendall τ_b against the leave-one-out consensus (the consensus of the *other*
  labelers of each item), averaged over items: a good labeler agrees with the rest, a random one ≈ 0.
- Gold items: items whose correct ranking is known; a labeler's gold accuracy is the share of gold
  pairs (strictly ordered in the answer) that their ranking orders the same way.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rlhfkit.data.records import Ranking


def positions(ranking: Ranking) -> dict[str, float]:
    """Each completion's rank position, 1 = best; tied completions share the mean of their positions."""
    result, start = {}, 1
    for group in ranking.groups:
        for cid in group:
            result[cid] = start + (len(group) - 1) / 2
        start += len(group)
    return result


def by_item(rankings: Sequence[Ranking]) -> dict[str, list[Ranking]]:
    items: dict[str, list[Ranking]] = defaultdict(list)
    for ranking in rankings:
        items[ranking.prompt_id].append(ranking)
    return dict(items)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def pairwise_agreement(rankings: Sequence[Ranking]) -> float:
    """Share of strict pairwise judgements on which two labelers of the same item agree (nan: none)."""
    agree = total = 0
    for item in by_item(rankings).values():
        for first, second in itertools.combinations([positions(r) for r in item], 2):
            shared = sorted(first.keys() & second.keys())
            for a, b in itertools.combinations(shared, 2):
                s1, s2 = _sign(first[a] - first[b]), _sign(second[a] - second[b])
                if s1 and s2:
                    total += 1
                    agree += s1 == s2
    return agree / total if total else math.nan


def krippendorff_alpha_ordinal(rankings: Sequence[Ranking]) -> float:
    """Krippendorff's α with the ordinal metric over rank positions (see the module docstring)."""
    coincidences: dict[tuple[float, float], float] = defaultdict(float)
    for item in by_item(rankings).values():
        units: dict[str, list[float]] = defaultdict(list)
        for ranking in item:
            for cid, position in positions(ranking).items():
                units[cid].append(position)
        for values in units.values():
            m = len(values)
            if m < 2:
                continue  # a unit seen by one labeler is not pairable
            for i, j in itertools.permutations(range(m), 2):
                coincidences[values[i], values[j]] += 1 / (m - 1)
    marginals: dict[float, float] = defaultdict(float)
    for (c, _), count in coincidences.items():
        marginals[c] += count
    n = sum(marginals.values())
    if n <= 1:
        return math.nan
    values = sorted(marginals)
    cumulative = list(itertools.accumulate(marginals[v] for v in values))
    index = {v: i for i, v in enumerate(values)}

    def delta2(c: float, k: float) -> float:
        lo, hi = sorted((index[c], index[k]))
        between = cumulative[hi] - (cumulative[lo - 1] if lo else 0.0)
        return (between - (marginals[c] + marginals[k]) / 2) ** 2

    observed = sum(count * delta2(c, k) for (c, k), count in coincidences.items()) / n
    expected = sum(marginals[c] * marginals[k] * delta2(c, k) for c in values for k in values) / (n * (n - 1))
    return 1.0 - observed / expected if expected > 0 else 1.0


def kendall_w(item: Sequence[Ranking]) -> float:
    """Kendall's coefficient of concordance W of one item's rankings, with the tie correction."""
    ranks = [positions(r) for r in item]
    completions = sorted(set().union(*ranks))
    m, n = len(ranks), len(completions)
    if m < 2 or n < 2 or any(len(r) != n for r in ranks):
        return math.nan
    sums = [sum(r[c] for r in ranks) for c in completions]
    mean = sum(sums) / n
    s = sum((x - mean) ** 2 for x in sums)
    ties = sum(len(g) ** 3 - len(g) for r in item for g in r.groups)
    denominator = m * m * (n**3 - n) - m * ties
    return 12 * s / denominator if denominator > 0 else 1.0


def kendall_tau_b(first: dict[str, float], second: dict[str, float]) -> float:
    """Kendall's τ_b between two rank-position maps over their shared completions (nan: undefined)."""
    concordant = discordant = tied_first = tied_second = 0
    for a, b in itertools.combinations(sorted(first.keys() & second.keys()), 2):
        s1, s2 = _sign(first[a] - first[b]), _sign(second[a] - second[b])
        if s1 and s2:
            concordant += s1 == s2
            discordant += s1 != s2
        elif s1:
            tied_second += 1
        elif s2:
            tied_first += 1
    denominator = math.sqrt((concordant + discordant + tied_first) * (concordant + discordant + tied_second))
    return (concordant - discordant) / denominator if denominator else math.nan


@dataclass
class LabelerStats:
    labeler_id: str
    items: int
    tau: float  # mean Kendall τ_b against the leave-one-out consensus
    tie_rate: float  # share of rankings with at least one tie
    flag_rate: float  # share of rankings with at least one flagged completion
    gold_accuracy: float | None = None  # share of gold pairs ordered correctly (None: no gold items)
    poor: bool = False
    reason: str = ""


def labeler_stats(rankings: Sequence[Ranking], consensus: Callable[[Sequence[Ranking]], Ranking],
                  gold: dict[str, Ranking] | None = None, min_tau: float = 0.2,
                  min_gold_accuracy: float = 0.7) -> list[LabelerStats]:
    """Per-labeler agreement with the others, and who is poor: mean τ below ``min_tau``, every ranking one
    tie (τ undefined: the labeler orders nothing), or gold accuracy below ``min_gold_accuracy``."""
    gold = gold or {}
    taus: dict[str, list[float]] = defaultdict(list)
    mine: dict[str, list[Ranking]] = defaultdict(list)
    gold_right: dict[str, int] = defaultdict(int)
    gold_total: dict[str, int] = defaultdict(int)
    for prompt_id, item in by_item(rankings).items():
        for ranking in item:
            mine[ranking.labeler_id].append(ranking)
            if prompt_id in gold:
                answer, given = positions(gold[prompt_id]), positions(ranking)
                for a, b in itertools.combinations(sorted(answer), 2):
                    if answer[a] != answer[b] and a in given and b in given:
                        gold_total[ranking.labeler_id] += 1
                        gold_right[ranking.labeler_id] += _sign(given[a] - given[b]) == _sign(answer[a] - answer[b])
                continue
            others = [r for r in item if r is not ranking]
            if others:
                tau = kendall_tau_b(positions(ranking), positions(consensus(others)))
                if not math.isnan(tau):
                    taus[ranking.labeler_id].append(tau)
    result = []
    for labeler, own in sorted(mine.items()):
        tau = sum(taus[labeler]) / len(taus[labeler]) if taus[labeler] else math.nan
        accuracy = gold_right[labeler] / gold_total[labeler] if gold_total[labeler] else None
        reasons = []
        if tau < min_tau:
            reasons.append(f"τ {tau:.2f} < {min_tau}")
        elif math.isnan(tau) and all(len(r.groups) == 1 for r in own):
            reasons.append("ties every completion, so τ is undefined")
        if accuracy is not None and accuracy < min_gold_accuracy:
            reasons.append(f"gold accuracy {accuracy:.2f} < {min_gold_accuracy}")
        result.append(LabelerStats(
            labeler_id=labeler, items=len(own), tau=tau,
            tie_rate=sum(any(len(g) > 1 for g in r.groups) for r in own) / len(own),
            flag_rate=sum(bool(r.flagged) for r in own) / len(own),
            gold_accuracy=accuracy, poor=bool(reasons), reason="; ".join(reasons)))
    return result


@dataclass
class Agreement:
    items: int
    labelers: int
    pairwise_agreement: float
    krippendorff_alpha: float
    mean_kendall_w: float
    per_labeler: list[LabelerStats]
    kendall_w_per_item: dict[str, float] = field(default_factory=dict)  # prompt id → W

    def least_agreed(self, n: int = 5) -> list[tuple[str, float]]:
        """The items the labelers agreed on least (lowest W): ambiguous prompts or unclear instructions."""
        return sorted(self.kendall_w_per_item.items(), key=lambda kv: kv[1])[:n]

    @property
    def poor_labelers(self) -> list[str]:
        return [s.labeler_id for s in self.per_labeler if s.poor]

    def as_dict(self) -> dict:
        """Plain data for JSON (an undefined statistic, NaN, becomes None)."""

        def clean(row: dict) -> dict:
            return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}

        return {**clean({"items": self.items, "labelers": self.labelers,
                         "pairwise_agreement": self.pairwise_agreement, "krippendorff_alpha": self.krippendorff_alpha,
                         "mean_kendall_w": self.mean_kendall_w}),
                "poor_labelers": self.poor_labelers, "per_labeler": [clean(vars(s)) for s in self.per_labeler],
                "kendall_w_per_item": self.kendall_w_per_item}


def agreement(rankings: Sequence[Ranking], consensus: Callable[[Sequence[Ranking]], Ranking],
              gold: dict[str, Ranking] | None = None, min_tau: float = 0.2,
              min_gold_accuracy: float = 0.7) -> Agreement:
    """All the agreement figures of a set of rankings (gold items excluded from the item statistics)."""
    gold = gold or {}
    regular = [r for r in rankings if r.prompt_id not in gold]
    per_item = {pid: w for pid, item in by_item(regular).items() if not math.isnan(w := kendall_w(item))}
    ws = list(per_item.values())
    return Agreement(
        items=len(by_item(regular)),
        labelers=len({r.labeler_id for r in rankings}),
        pairwise_agreement=pairwise_agreement(regular),
        krippendorff_alpha=krippendorff_alpha_ordinal(regular),
        mean_kendall_w=sum(ws) / len(ws) if ws else math.nan,
        per_labeler=labeler_stats(rankings, consensus, gold, min_tau, min_gold_accuracy),
        kendall_w_per_item=per_item,
    )
