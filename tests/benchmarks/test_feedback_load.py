"""The load benchmark's counts: what it reports as lost, duplicated and over-filled comes from the rows."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("feedback_load", Path(__file__).parents[2] / "benchmarks" /
                                              "feedback_load.py")
load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(load)


def test_clean_rows_count_nothing_wrong():
    rows = [(1, 10, 100), (2, 11, 100), (3, 12, 100), (4, 10, 101)]
    assert load.audit(rows, acknowledged=[1, 2, 3, 4], overlap=3) == {
        "stored": 4, "lost": 0, "duplicated": 0, "over_filled_items": 0}


def test_a_second_label_of_one_labeler_on_one_item_is_a_duplicate_and_can_over_fill():
    rows = [(1, 10, 100), (2, 10, 100), (3, 10, 100), (4, 11, 100), (5, 11, 101)]
    counts = load.audit(rows, acknowledged=[1, 4, 5], overlap=3)
    assert counts["duplicated"] == 2  # labeler 10 has three labels on item 100: two too many
    assert counts["over_filled_items"] == 1  # item 100 has 4 labels at k = 3


def test_distinct_labelers_beyond_k_over_fill_without_duplicates():
    rows = [(i, 10 + i, 100) for i in range(4)] + [(9, 10, 101)]
    counts = load.audit(rows, acknowledged=range(4), overlap=3)
    assert counts["duplicated"] == 0 and counts["over_filled_items"] == 1


def test_an_acknowledged_label_missing_from_the_table_is_lost():
    rows = [(1, 10, 100), (3, 11, 100)]
    assert load.audit(rows, acknowledged=[1, 2, 3, 4], overlap=3)["lost"] == 2  # 2 and 4
    assert load.audit(rows, acknowledged=[1], overlap=3)["lost"] == 0  # stored but unacknowledged: not lost


def test_latency_percentiles_in_milliseconds():
    timed = load.latency_ms([i / 1000 for i in range(1, 101)])  # 1 ms … 100 ms
    assert timed["n"] == 100 and timed["p50"] == 50.5 and timed["p95"] == 95.0 and timed["max"] == 100.0
    assert load.latency_ms([]) == {"n": 0, "p50": None, "p95": None, "max": None}


def test_the_summary_states_the_offered_load_next_to_the_achieved_rate():
    timed = {"p50": 80.0, "p95": 200.0}
    result = {"database": "postgresql", "labelers": 200, "think_seconds": 1.0, "offered_labels_per_second": 200.0,
              "killed": False, "labels_per_second": 150.2, "latency_ms": {"next": timed, "submit": timed}}
    line = load.summary(result)
    assert "offered ≤ 200.0 labels/s (200 labelers / 1.0 s think)" in line and "achieved 150.2 labels/s" in line
    assert "no think time" in load.summary({**result, "think_seconds": 0.0, "offered_labels_per_second": None})
