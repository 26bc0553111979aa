import pytest

from conftest import make_completions
from rlhfkit.data.io import DataError, write_records
from rlhfkit.data.pairs import borda, group_by_prompt, load_rankings, ranking_pairs, rankings_to_pairs
from rlhfkit.data.records import Completion, Ranking

COMPLETIONS = make_completions("p0", 4)
BY_ID = {c.id: c for c in COMPLETIONS}


def ranking(groups, flagged=(), labeler="l1"):
    return Ranking(prompt_id="p0", labeler_id=labeler, groups=[[f"p0-{i}" for i in g] for g in groups],
                   flagged=[f"p0-{i}" for i in flagged])


def as_ids(pairs):
    return {(p.chosen_id[-1], p.rejected_id[-1]) for p in pairs}


def test_four_ranked_completions_give_six_pairs_preferred_first():
    pairs = ranking_pairs(ranking([[2], [0], [3], [1]]), BY_ID)
    assert len(pairs) == 6
    assert as_ids(pairs) == {("2", "0"), ("2", "3"), ("2", "1"), ("0", "3"), ("0", "1"), ("3", "1")}
    assert all(BY_ID[p.chosen_id].text == p.chosen for p in pairs)


def test_ties_produce_no_pairs():
    pairs = ranking_pairs(ranking([[0], [1, 2], [3]]), BY_ID)
    assert len(pairs) == 5
    assert ("1", "2") not in as_ids(pairs) and ("2", "1") not in as_ids(pairs)
    assert ranking_pairs(ranking([[0, 1, 2, 3]]), BY_ID) == []


def test_flagged_completions_dropped_kept_or_ranked_last():
    r = ranking([[0], [1], [2], [3]], flagged=[1])
    assert as_ids(ranking_pairs(r, BY_ID, "drop")) == {("0", "2"), ("0", "3"), ("2", "3")}
    assert len(ranking_pairs(r, BY_ID, "keep")) == 6
    last = as_ids(ranking_pairs(r, BY_ID, "last"))
    assert ("2", "1") in last and ("3", "1") in last and ("1", "2") not in last


def test_borda_consensus_with_ties_and_majority_flags():
    votes = [ranking([[0], [1], [2], [3]], [3], "a"), ranking([[1], [0], [2], [3]], [3], "b"),
             ranking([[0], [1, 2], [3]], [2], "c")]
    consensus = borda(votes)
    # scores: 0 -> 3+2+3 = 8, 1 -> 2+3+1.5 = 6.5, 2 -> 1+1+1.5 = 3.5, 3 -> 0
    assert consensus.groups == [["p0-0"], ["p0-1"], ["p0-2"], ["p0-3"]]
    assert consensus.flagged == ["p0-3"]  # flagged by 2 of 3; p0-2 by only 1


def test_borda_exact_tie_becomes_a_tie_group():
    consensus = borda([ranking([[0], [1], [2], [3]], (), "a"), ranking([[1], [0], [2], [3]], (), "b")])
    assert consensus.groups == [["p0-0", "p0-1"], ["p0-2"], ["p0-3"]]


def test_rankings_to_pairs_combines_labelers_or_keeps_each():
    votes = [ranking([[0], [1], [2], [3]], (), "a"), ranking([[0], [1], [2], [3]], (), "b")]
    combined = rankings_to_pairs(votes, COMPLETIONS)
    assert len(combined) == 6 and combined[0].provenance["labelers"] == ["a", "b"]
    assert len(rankings_to_pairs(votes, COMPLETIONS, consensus=None)) == 12
    with pytest.raises(ValueError, match="unknown consensus"):
        rankings_to_pairs(votes, COMPLETIONS, consensus="dictator")


def test_load_rankings_reports_file_line_for_bad_ranking(tmp_path):
    path = tmp_path / "rankings.jsonl"
    write_records(path, [ranking([[0], [1], [2], [3]]), ranking([[0], [1], [2]], labeler="l2")])
    with pytest.raises(DataError, match=r"rankings.jsonl:2: field 'groups': .*missing \['p0-3'\]"):
        load_rankings(path, COMPLETIONS)


def test_load_rankings_refuses_a_labeler_ranking_twice_and_unknown_prompts(tmp_path):
    path = tmp_path / "rankings.jsonl"
    write_records(path, [ranking([[0], [1], [2], [3]]), ranking([[3], [1], [2], [0]])])
    with pytest.raises(DataError, match="ranked prompt 'p0' twice"):
        load_rankings(path, COMPLETIONS)
    write_records(path, [Ranking(prompt_id="zz", labeler_id="l", groups=[["a"]])])
    with pytest.raises(DataError, match="unknown prompt_id 'zz'"):
        load_rankings(path, COMPLETIONS)


def test_group_by_prompt_keeps_each_prompts_pairs_together():
    pairs = rankings_to_pairs([ranking([[0], [1], [2], [3]])], COMPLETIONS)
    other = rankings_to_pairs([Ranking(prompt_id="p1", labeler_id="l", groups=[["p1-0"], ["p1-1"]])],
                              make_completions("p1", 2))
    groups = group_by_prompt([pairs[0], *other, *pairs[1:]])
    assert [len(g) for g in groups] == [6, 1]


def test_flagged_last_works_on_rankings_without_flags():
    r = ranking([[0], [1], [2], [3]])
    assert as_ids(ranking_pairs(r, BY_ID, "last")) == as_ids(ranking_pairs(r, BY_ID, "keep"))
    assert len(rankings_to_pairs([r], COMPLETIONS, flagged="last")) == 6
    with pytest.raises(ValueError, match="flagged must be 'drop', 'keep' or 'last', not 'first'"):
        ranking_pairs(r, BY_ID, "first")


def test_pairs_carry_whether_each_answer_was_cut_at_the_generation_limit():
    completions = {c.id: c for c in [
        Completion(id="a", prompt_id="p", prompt="q", text="long answer", index=0, truncated=True),
        Completion(id="b", prompt_id="p", prompt="q", text="short", index=1)]}
    ranking = Ranking(prompt_id="p", labeler_id="l", groups=[["a"], ["b"]])
    [forward] = ranking_pairs(ranking, completions)
    [backward] = ranking_pairs(ranking.model_copy(update={"groups": [["b"], ["a"]]}), completions)
    assert (forward.chosen_truncated, forward.rejected_truncated) == (True, False)
    assert (backward.chosen_truncated, backward.rejected_truncated) == (False, True)
