import math

import pytest
import torch

from rlhfkit.rl.advantages import gae, group_normalized, leave_one_out, whiten
from rlhfkit.rl.grpo import GRPOConfig, clipped_surrogate, kl_loss_term, rloo_config
from rlhfkit.rl.kl import KL_ESTIMATORS, KLController, kl_estimator
from rlhfkit.rl.ppo import PPOConfig, ppo_losses


def test_gae_matches_a_hand_computed_example():
    # one sequence of 3 valid tokens and one padding token; γ = 0.9, λ = 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.3                      # last token: no bootstrap
    d1 = 0.0 + 0.9 * 0.3 - 0.4
    d0 = 0.0 + 0.9 * 0.4 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    a0 = d0 + 0.45 * a1
    assert advantages.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])
    assert returns.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0])


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    rewards, values = torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[1.0, 2.0, 3.0]])
    advantages, _ = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert advantages.tolist()[0] == pytest.approx([0.6 - 1.0, 0.5 - 2.0, 0.3 - 3.0])


def test_whiten_ignores_padding():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6) and w[0, 3].item() == 0.0


def test_group_baselines():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    assert leave_one_out(scores, 4).tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, 0 - 4 / 3,
                                                               0 - 4 / 3, 0 - 4 / 3, 4 - 0])
    grpo = group_normalized(scores, 4).view(2, 4)
    assert grpo.mean(dim=1).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert grpo.std(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(scores, 1)


def test_every_kl_estimator_is_zero_when_policy_equals_reference():
    logprobs = torch.log(torch.tensor([0.1, 0.5, 0.9]))
    for estimator in KL_ESTIMATORS.values():
        assert estimator(logprobs, logprobs).abs().max().item() == 0.0
    # k3 and k2 are never negative; k1 can be, per token
    other = torch.log(torch.tensor([0.3, 0.2, 0.95]))
    assert (kl_estimator("k3")(logprobs, other) >= 0).all() and (kl_estimator("k1")(logprobs, other) < 0).any()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimator("k9")


def _expected_kl_term_gradient(importance_weight: bool, logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """∇_θ E_{y∼π_old}[GRPO's KL term at y], summed exactly over a small vocabulary, at θ = θ_old."""
    theta = logits.clone().requires_grad_(True)
    logprobs = torch.log_softmax(theta, dim=-1)
    old = logprobs.detach()
    term = kl_loss_term(kl_estimator("k3"), logprobs, torch.exp(logprobs - old), ref, importance_weight)
    (old.exp() * term).sum().backward()
    return theta.grad


def test_the_importance_weighted_k3_term_has_the_gradient_of_kl_policy_to_reference():
    """With ρ_t the term's expected gradient is ∇KL(π_θ ‖ π_ref); without it, ∇KL(π_ref ‖ π_θ)."""
    torch.manual_seed(0)
    logits, ref = torch.randn(6), torch.log_softmax(torch.randn(6), dim=-1)
    theta = logits.clone().requires_grad_(True)
    policy = torch.log_softmax(theta, dim=-1)
    (policy.exp() * (policy - ref)).sum().backward()  # KL(π_θ ‖ π_ref)
    reverse = logits.clone().requires_grad_(True)
    (ref.exp() * (ref - torch.log_softmax(reverse, dim=-1))).sum().backward()  # KL(π_ref ‖ π_θ)
    assert torch.allclose(_expected_kl_term_gradient(True, logits, ref), theta.grad, atol=1e-6)
    assert torch.allclose(_expected_kl_term_gradient(False, logits, ref), reverse.grad, atol=1e-6)
    assert not torch.allclose(theta.grad, reverse.grad, atol=1e-3)


def _surrogate_gradient(action: str, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """∂L/∂log π_θ(y_t) of the loss the trainer takes for ``action``, at π_θ = π_θ_old."""
    logprobs = torch.zeros_like(mask).requires_grad_(True)
    surrogate, _ = clipped_surrogate(logprobs, torch.zeros_like(mask), advantages, mask, 0.2, action)
    per_completion = surrogate if action == "completion" else (surrogate * mask).sum(1) / mask.sum(1)
    (-per_completion.mean()).backward()
    return logprobs.grad


def test_a_completion_action_weighs_every_token_by_its_advantage_a_token_action_by_advantage_over_length():
    """At ρ = 1: "completion" is REINFORCE, −A_i/G on each of the completion's tokens; "token" divides by |y_i|."""
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # lengths 4 and 2
    completion = _surrogate_gradient("completion", advantages, mask)
    token = _surrogate_gradient("token", advantages, mask)
    assert torch.allclose(completion, -advantages.unsqueeze(1) / 2 * mask)
    assert torch.allclose(token, -advantages.unsqueeze(1) / 2 * mask / mask.sum(1, keepdim=True))


def test_a_completion_ratio_is_the_product_of_its_token_ratios_and_is_clipped_as_one():
    """Two tokens at ratio 1.15 each: no token is clipped (ε = 0.2), the completion's 1.3225 is."""
    mask = torch.ones(1, 2)
    logprobs = torch.full((1, 2), math.log(1.15), requires_grad=True)
    surrogate, ratio = clipped_surrogate(logprobs, torch.zeros(1, 2), torch.ones(1), mask, 0.2, "completion")
    assert ratio.item() == pytest.approx(1.15 ** 2) and surrogate.item() == pytest.approx(1.2)
    surrogate.sum().backward()
    assert torch.all(logprobs.grad == 0)  # clipped on the side of a positive advantage: no gradient
    per_token, ratio = clipped_surrogate(logprobs.detach(), torch.zeros(1, 2), torch.ones(1), mask, 0.2, "token")
    assert torch.allclose(ratio, torch.full((1, 2), 1.15)) and torch.allclose(per_token, ratio)


def test_a_completion_action_refuses_a_kl_term_in_the_loss_by_field():
    with pytest.raises(ValueError, match="field 'action': 'completion' needs the KL in the reward"):
        GRPOConfig(action="completion")
    assert rloo_config(action="completion").action == "completion"


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    fixed = KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=1.0, horizon=100)
    adaptive.update(10.0, 50)  # far above target: error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 0.5))
    adaptive.update(0.0, 50)  # below target: shrink
    assert adaptive.value == pytest.approx(0.11 * (1 - 0.2 * 0.5))


def test_clipped_surrogate_takes_the_pessimistic_side():
    config = PPOConfig(clip_eps=0.2, vf_coef=0.0, entropy_coef=0.0)
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    zeros, mask = torch.zeros(1, 2), torch.ones(1, 2)
    # A = +1: min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5 → loss −(1.2 + 0.5) / 2
    loss, stats = ppo_losses(new, old, torch.ones(1, 2), zeros, zeros, zeros, zeros, mask, config)
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert stats["policy/clipfrac"].item() == 1.0
    # A = −1: min(−1.5, −1.2) = −1.5 and min(−0.5, −0.8) = −0.8 → loss (1.5 + 0.8) / 2
    loss, _ = ppo_losses(new, old, -torch.ones(1, 2), zeros, zeros, zeros, zeros, mask, config)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)
    assert stats["policy/approx_kl"].item() == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2)


def test_value_loss_clipping_and_total_loss_coefficients():
    config = PPOConfig(value_clip=0.2, vf_coef=0.5, entropy_coef=0.1)
    zeros, mask = torch.zeros(1, 1), torch.ones(1, 1)
    values, old_values, returns = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])
    # unclipped error 0, clipped value 0.2 → error 0.64: the max is taken
    loss, stats = ppo_losses(zeros, zeros, zeros, values, old_values, returns, torch.tensor([[2.0]]), mask, config)
    assert stats["loss/value"].item() == pytest.approx(0.5 * 0.64)
    assert loss.item() == pytest.approx(0.5 * 0.32 - 0.1 * 2.0)
