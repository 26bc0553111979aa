"""KL(policy ‖ reference) per token: estimators chosen by name, and the coefficient's controllers.

With ``log r = log π_ref(y_t) − log π_θ(y_t)`` for a token y_t sampled from π_θ (Schulman's notation):

    k1 = −log r                  unbiased, can be negative per sample
    k2 = ½ (log r)²              biased, low variance, ≥ 0
    k3 = (r − 1) − log r         unbiased, low variance, ≥ 0

Each is zero when the policy equals the reference. The estimates are only valid when y_t was sampled
from the same distribution whose log-prob is used: rollouts therefore sample with plain temperature
sampling (no top-k / top-p) and log-probs are computed at that same temperature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimator(name: str) -> KLEstimator:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


class KLController:
    """The KL coefficient β: fixed, or adaptive (Ziegler et al. 2019) when ``target`` is set:

        e = clip(KL / target − 1, −0.2, 0.2),    β ← β · (1 + e · n / horizon)

    after each rollout of n sequences, so β grows while KL exceeds the target and shrinks below it.
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10_000) -> None:
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_sequences: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_sequences / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
