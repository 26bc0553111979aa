"""The order a trainer visits its data in: one seeded permutation per epoch, for the RL trainers' prompts,
DPO's pairs and the reward model's prompts or pairs.

Epoch 0 is ``torch.randperm(n)`` from a generator seeded with the seed: the order torch's ``RandomSampler``
(TRL's trainers) draws at that seed, so a seed means the same data in rlhfkit and TRL (benchmarks/README.md).
A later epoch's generator is seeded by numpy's ``SeedSequence((seed, epoch))``, so that no two (seed, epoch)
share an order: seeded seed + epoch, seed s's epoch 1 was seed s + 1's epoch 0, and three seeds trained on
one sequence shifted by an epoch.
"""

from __future__ import annotations

import numpy as np
import torch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The positions of n items in the order ``epoch`` visits them (see the module docstring)."""
    start = seed if epoch == 0 else int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(start)).tolist()
