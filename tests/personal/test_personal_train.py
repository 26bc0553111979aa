"""The background training queue of personal models."""

import threading

from rlhfkit.personal.train import TrainingQueue


def test_a_user_whose_training_is_running_is_not_queued_again_until_it_ends() -> None:
    started, release, runs = threading.Event(), threading.Event(), []

    def train(user_id: int) -> None:
        runs.append(user_id)
        started.set()
        release.wait(10)

    queue = TrainingQueue(train, every=2)
    assert queue.trigger(1, pairs_now=2, pairs_trained=0) is not None
    started.wait(10)
    # its version is not published yet, so its pairs still look untrained: no second training of the same pairs
    assert queue.trigger(1, pairs_now=3, pairs_trained=0) is None
    assert queue.trigger(2, pairs_now=2, pairs_trained=0) is not None  # another user still queues
    release.set()
    queue.wait()
    assert runs == [1, 2]
    assert queue.trigger(1, pairs_now=4, pairs_trained=2) is not None  # after it ended, new pairs train again
    queue.wait()
    queue.shutdown()
    assert runs == [1, 2, 1]
