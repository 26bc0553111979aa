"""The data-order check: which steps see the same items in the same order on both sides."""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("data_order_vs_trl", Path(__file__).parents[2] / "benchmarks" /
                                              "data_order_vs_trl.py")
data_order_vs_trl = sys.modules["data_order_vs_trl"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(data_order_vs_trl)


def test_the_same_order_is_the_same_at_every_step():
    order = [[3, 1], [0, 2]]
    assert data_order_vs_trl.compare_orders(order, order) == {
        "steps": 2, "same_steps": 2, "same_until": 2, "items_trl": 4, "items_rlhfkit": 4, "items_both": 4}


def test_the_same_items_in_another_order_within_a_step_count_as_a_different_step():
    result = data_order_vs_trl.compare_orders([[3, 1], [0, 2], [4, 5]], [[3, 1], [2, 0], [4, 5]])
    assert (result["same_steps"], result["same_until"]) == (2, 1)


def test_items_seen_by_one_side_only_are_not_counted_as_common():
    result = data_order_vs_trl.compare_orders([[0, 1], [2, 3]], [[0, 1], [1, 4]])
    assert (result["items_trl"], result["items_rlhfkit"], result["items_both"]) == (4, 3, 2)
