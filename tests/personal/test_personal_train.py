"""The personal trainer's loss and its background training queue."""

import threading

import pytest
import torch

from rlhfkit.config import FieldError
from rlhfkit.models.policy import TokenBatch
from rlhfkit.personal.train import PersonalDPOConfig, TrainingQueue, forward_kl, nll_tokens, personal_loss


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


def test_submit_queues_a_training_even_while_one_of_the_same_owner_waits_and_runs_them_in_order() -> None:
    """After a deletion, the population and the users whose versions started from it are trained again: a
    training queued before the deletion read the pairs before it, so a second one is queued after it."""
    started, release, runs = threading.Event(), threading.Event(), []

    def train(owner: int | str) -> None:
        runs.append(owner)
        started.set()
        release.wait(10)

    queue = TrainingQueue(train, every=1)
    queue.trigger(1, pairs_now=1, pairs_trained=0)
    started.wait(10)
    queue.submit("population"), queue.submit(1)
    assert queue.trigger(1, pairs_now=5, pairs_trained=0) is None  # one of user 1's is waiting
    release.set()
    queue.wait()
    queue.shutdown()
    assert runs == [1, "population", 1]


def _chosen_eos_gradient(config: PersonalDPOConfig) -> float:
    """d L / d log π(EOS) of the first chosen answer (whole: it ends in EOS), for a batch of two pairs."""
    eos, pad = 0, 99
    completions = torch.tensor([[5, 6, eos], [5, 6, 7], [8, eos, pad], [9, eos, pad]])  # chosen ×2, rejected ×2
    mask = (completions != pad).long()
    batch = TokenBatch(torch.ones(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long), completions, mask)
    logprobs = torch.full((4, 3), -1.0, requires_grad=True)
    loss, _ = personal_loss(logprobs * mask, torch.full((4,), -3.0), nll_tokens(batch, eos, config), config)
    loss.backward()
    return logprobs.grad[0, 2].item()


def test_the_nll_term_leaves_the_chosen_answers_eos_to_dpo_unless_nll_on_eos() -> None:
    dpo_only = _chosen_eos_gradient(PersonalDPOConfig(nll_coef=0.0))
    assert _chosen_eos_gradient(PersonalDPOConfig(nll_coef=1.0)) == pytest.approx(dpo_only)
    # with it: α / |y_c| / (chosen answers in the batch) more pull towards stopping there
    assert _chosen_eos_gradient(PersonalDPOConfig(nll_coef=1.0, nll_on_eos=True)) == pytest.approx(dpo_only - 1 / 3 / 2)


def test_an_answer_cut_at_the_generation_limit_has_every_token_in_the_nll_term() -> None:
    completions = torch.tensor([[5, 6, 0], [5, 6, 7], [8, 0, 99], [9, 0, 99]])
    batch = TokenBatch(torch.ones(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long), completions,
                       (completions != 99).long())
    assert nll_tokens(batch, 0, PersonalDPOConfig()).tolist() == [[1, 1, 0], [1, 1, 1]]
    assert nll_tokens(batch, 0, PersonalDPOConfig(nll_on_eos=True)).tolist() == [[1, 1, 1], [1, 1, 1]]


def test_the_forward_kl_is_zero_for_equal_distributions_and_counts_only_what_the_start_gives_mass() -> None:
    torch.manual_seed(0)
    start = torch.log_softmax(torch.randn(2, 3, 5), dim=-1)
    policy = torch.log_softmax(torch.randn(2, 3, 5), dim=-1).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert forward_kl(start, start, mask).item() == pytest.approx(0.0, abs=1e-7)
    by_hand = [(start[b, t].exp() * (start[b, t] - policy[b, t])).sum().item() for b, t in [(0, 0), (0, 1), (1, 0)]]
    kl = forward_kl(start, policy, mask)  # the masked-out positions count nothing
    assert kl.item() == pytest.approx(sum(by_hand) / 3, rel=1e-6) and kl.item() > 0
    start[..., 4] = float("-inf")  # a token the start never gives: no NaN, in the value or the gradient
    start = torch.log_softmax(start, dim=-1)
    forward_kl(start, policy, mask).backward()
    assert torch.isfinite(policy.grad).all() and (policy.grad[..., 4] == 0).all()


def test_the_kl_term_adds_gamma_times_the_kl_and_nothing_when_off() -> None:
    logprobs, reference = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]]), torch.tensor([-3.0, -4.0])
    nll_mask, kl = torch.ones(1, 2), torch.tensor(0.25)
    plain, _ = personal_loss(logprobs, reference, nll_mask, PersonalDPOConfig())
    with_kl, _ = personal_loss(logprobs, reference, nll_mask, PersonalDPOConfig(kl_coef=2.0), kl)
    assert with_kl.item() == pytest.approx(plain.item() + 0.5)
    assert personal_loss(logprobs, reference, nll_mask, PersonalDPOConfig(), kl)[0].item() == plain.item()


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_a_kl_coefficient_below_zero_or_not_finite_is_refused_by_name(value) -> None:
    with pytest.raises(FieldError, match="field 'kl_coef'"):
        PersonalDPOConfig(kl_coef=value)
