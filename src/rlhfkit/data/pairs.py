"""Rankings → preference pairs.

A ranking of N completions as ordered groups g_1 ≻ g_2 ≻ … ≻ g_m (a group of several is a tie) gives
every pair (a, b) with a ∈ g_i, b ∈ g_j, i < j: N-choose-2 pairs when there are no ties, fewer with
them (tied completions give no pair). Several labelers' rankings of one prompt are first combined by a
consensus function chosen by name from :data:`CONSENSUS` (or passed in).

InstructGPT's K-way batching keeps all the pairs of one prompt together as one batch element, so that
one prompt's comparisons are not spread over an epoch (which made their reward model overfit):
:func:`group_by_prompt` gives those groups and the reward model trainer batches by them.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from rlhfkit.data.io import DataError, iter_records
from rlhfkit.data.records import Completion, PreferencePair, Ranking, render_text

Consensus = Callable[[Sequence[Ranking]], Ranking]
FlaggedPolicy = Literal["drop", "keep", "last"]


def _majority_flags(rankings: Sequence[Ranking]) -> list[str]:
    """Completions flagged by a strict majority of the labelers."""
    flags: dict[str, int] = defaultdict(int)
    for ranking in rankings:
        for cid in ranking.flagged:
            flags[cid] += 1
    return [cid for cid, n in flags.items() if n > len(rankings) / 2]


def _consensus(rankings: Sequence[Ranking], method: str, groups: list[list[str]]) -> Ranking:
    first = rankings[0]
    return Ranking(prompt_id=first.prompt_id, labeler_id=f"consensus:{method}", criterion=first.criterion,
                   groups=groups, flagged=_majority_flags(rankings))


def borda(rankings: Sequence[Ranking]) -> Ranking:
    """Borda count with ties: each labeler gives completion c the score

        s(c) = #{completions ranked strictly below c} + ½ · #{others tied with c},

    scores are summed over labelers and sorted; equal totals form a tie group. A completion is flagged
    in the consensus when a strict majority of labelers flagged it.
    """
    if not rankings:
        raise ValueError("consensus of no rankings")
    totals: dict[str, float] = defaultdict(float)
    for ranking in rankings:
        below = len(ranking.completion_ids)
        for group in ranking.groups:
            below -= len(group)
            for cid in group:
                totals[cid] += below + 0.5 * (len(group) - 1)
    groups: list[list[str]] = []
    previous = None
    for cid in sorted(totals, key=lambda c: -totals[c]):
        if previous is not None and abs(totals[cid] - previous) < 1e-9:
            groups[-1].append(cid)
        else:
            groups.append([cid])
        previous = totals[cid]
    return _consensus(rankings, "borda", groups)


def ranked_pairs(rankings: Sequence[Ranking]) -> Ranking:
    """Tideman's ranked pairs. For every two completions, margin(a, b) = #labelers ranking a above b −
    #labelers ranking b above a. Pairs with a positive margin are taken from the largest margin down
    (equal margins in a fixed order) and locked in as a ≻ b unless that would close a cycle with the
    pairs already locked. The ranking peels off the locked graph's sources: the completions nothing
    locked beats form the first group (several = a tie), and so on. Flags as in :func:`borda`.
    """
    if not rankings:
        raise ValueError("consensus of no rankings")
    place = [{cid: i for i, group in enumerate(r.groups) for cid in group} for r in rankings]
    completions = sorted(set().union(*place))
    margins = []
    for a, b in itertools.combinations(completions, 2):
        margin = sum((p[a] < p[b]) - (p[a] > p[b]) for p in place if a in p and b in p)
        if margin:
            margins.append((abs(margin), a, b) if margin > 0 else (abs(margin), b, a))
    beats: dict[str, set[str]] = defaultdict(set)

    def reaches(start: str, goal: str) -> bool:
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(beats[node])
        return False

    for _, winner, loser in sorted(margins, key=lambda m: (-m[0], m[1], m[2])):
        if not reaches(loser, winner):
            beats[winner].add(loser)
    remaining, groups = set(completions), []
    while remaining:
        beaten = {loser for winner in remaining for loser in beats[winner]}
        sources = sorted(remaining - beaten)
        groups.append(sources)
        remaining -= set(sources)
    return _consensus(rankings, "ranked_pairs", groups)


# Consensus methods by name.
CONSENSUS: dict[str, Consensus] = {"borda": borda, "ranked_pairs": ranked_pairs}


def ranking_pairs(ranking: Ranking, completions: dict[str, Completion], flagged: FlaggedPolicy = "drop",
                  provenance: dict | None = None) -> list[PreferencePair]:
    """All pairs of one ranking, preferred first; ties give none.

    ``flagged``: 'drop' removes flagged completions before pairing; 'keep' pairs them by their rank;
    'last' moves them below every unflagged completion (tied among themselves).
    """
    if flagged not in ("drop", "keep", "last"):
        raise ValueError(f"flagged must be 'drop', 'keep' or 'last', not {flagged!r}")
    groups = ranking.groups
    marked = set(ranking.flagged)
    if flagged != "keep":
        groups = [[c for c in g if c not in marked] for g in groups]
    if flagged == "last":
        groups = [*groups, [c for c in ranking.completion_ids if c in marked]]
    groups = [g for g in groups if g]
    base = {"criterion": ranking.criterion, "labeler": ranking.labeler_id, **(provenance or {})}
    pairs = []
    for i, better in enumerate(groups):
        for worse in groups[i + 1:]:
            for a in better:
                for b in worse:
                    ca, cb = completions[a], completions[b]
                    pairs.append(PreferencePair(prompt=ca.prompt, chosen=ca.text, rejected=cb.text,
                                                prompt_id=ranking.prompt_id, chosen_id=a, rejected_id=b,
                                                provenance=base, chosen_truncated=ca.truncated,
                                                rejected_truncated=cb.truncated))
    return pairs


def check_ranking(ranking: Ranking, completion_ids: dict[str, set[str]]) -> None:
    """ValueError unless the ranking's prompt is known and its groups partition that prompt's completions."""
    if ranking.prompt_id not in completion_ids:
        raise ValueError(f"unknown prompt_id {ranking.prompt_id!r}: no completions for it")
    ranking.check_partition(completion_ids[ranking.prompt_id])


def completion_ids_by_prompt(completions: Iterable[Completion]) -> dict[str, set[str]]:
    ids: dict[str, set[str]] = defaultdict(set)
    for c in completions:
        ids[c.prompt_id].add(c.id)
    return dict(ids)


def load_rankings(path: str | os.PathLike, completions: Iterable[Completion]) -> list[Ranking]:
    """Read rankings and check each against the completions; errors name the file and line."""
    ids = completion_ids_by_prompt(completions)
    seen: dict[tuple[str, str], int] = {}
    rankings = []
    for line, ranking in iter_records(path, Ranking):
        try:
            check_ranking(ranking, ids)
        except ValueError as exc:
            raise DataError(str(exc), path, line, "groups") from None
        key = (ranking.prompt_id, ranking.labeler_id)
        if key in seen:
            raise DataError(f"labeler {key[1]!r} ranked prompt {key[0]!r} twice (first on line {seen[key]})",
                            path, line, "labeler_id")
        seen[key] = line
        rankings.append(ranking)
    return rankings


def rankings_to_pairs(rankings: Iterable[Ranking], completions: Iterable[Completion],
                      consensus: str | Consensus | None = "borda",
                      flagged: FlaggedPolicy = "drop") -> list[PreferencePair]:
    """Pairs from all rankings: per prompt, the consensus of its labelers' rankings (or, with
    ``consensus=None``, every labeler's ranking on its own)."""
    by_id = {c.id: c for c in completions}
    ids = completion_ids_by_prompt(by_id.values())
    if isinstance(consensus, str) and consensus not in CONSENSUS:
        raise ValueError(f"unknown consensus {consensus!r}; choose one of {sorted(CONSENSUS)}")
    combine = CONSENSUS[consensus] if isinstance(consensus, str) else consensus
    per_prompt: dict[str, list[Ranking]] = defaultdict(list)
    for ranking in rankings:
        check_ranking(ranking, ids)
        per_prompt[ranking.prompt_id].append(ranking)
    pairs: list[PreferencePair] = []
    for group in per_prompt.values():
        if combine is None:
            for ranking in group:
                pairs += ranking_pairs(ranking, by_id, flagged)
            continue
        name = consensus if isinstance(consensus, str) else getattr(combine, "__name__", "custom")
        provenance = {"consensus": name, "labelers": sorted(r.labeler_id for r in group)}
        pairs += ranking_pairs(combine(group), by_id, flagged, provenance)
    return pairs


def group_by_prompt(pairs: Iterable[PreferencePair]) -> list[list[PreferencePair]]:
    """K-way batching: one list per prompt (by prompt_id, else by prompt text), in first-seen order."""
    groups: dict[str, list[PreferencePair]] = {}
    for pair in pairs:
        key = pair.prompt_id if pair.prompt_id is not None else render_text(pair.prompt)
        groups.setdefault(key, []).append(pair)
    return list(groups.values())
