import pytest
import torch

from conftest import build_tiny_causal, build_tiny_seq2seq, make_generation_config_hostile, word_tokenizer
from rlhfkit.models.policy import SamplingDistribution
from rlhfkit.models.reference import Reference, add_lora
from rlhfkit.models.value_head import Actor
from rlhfkit.reward.base import FunctionReward
from rlhfkit.rl.kl import KL_ESTIMATORS
from rlhfkit.rollout import collect_rollout, completion_mask

PROMPTS = ["how do i fix bike", "write code please", "plan day"]
LENGTH = FunctionReward(lambda p, c: len(c.split()))


def rollout_for(model, value_head=True, n=2, temperature=0.7):
    tokenizer = word_tokenizer()
    from rlhfkit.models.policy import prepare_tokenizer

    prepare_tokenizer(tokenizer, model)
    actor = Actor(model, value_head=value_head)
    return collect_rollout(actor, Reference(model), tokenizer, PROMPTS, LENGTH,
                           SamplingDistribution(temperature), max_new_tokens=6, n_per_prompt=n), actor


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    tokens = torch.tensor([[5, 6, 3, 0, 3], [5, 6, 7, 8, 9]])
    assert completion_mask(tokens, eos_token_id=3).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_rollout_shapes_and_scores_for_causal_and_seq2seq():
    for model in (build_tiny_causal(), build_tiny_seq2seq()):
        rollout, _ = rollout_for(model)
        assert len(rollout.completions) == 6 and rollout.prompts[:2] == [PROMPTS[0]] * 2
        assert rollout.logprobs.shape == rollout.ref_logprobs.shape == rollout.values.shape
        assert rollout.scores.tolist() == [float(len(c.split())) for c in rollout.completions]


def test_kl_to_an_identical_reference_is_exactly_zero_and_ratio_starts_at_one():
    """Guard against the negative-KL failure: log-probs come from the distribution that sampled."""
    for model in (build_tiny_causal(), build_tiny_seq2seq()):
        model.generation_config.top_k, model.generation_config.top_p = 5, 0.5  # must be ignored
        rollout, actor = rollout_for(model, temperature=0.7)
        for estimator in KL_ESTIMATORS.values():
            assert (estimator(rollout.logprobs, rollout.ref_logprobs) * rollout.mask).abs().max() < 1e-5
        recomputed, _, _ = actor(rollout.batch, SamplingDistribution(0.7))
        assert torch.allclose(recomputed * rollout.mask, rollout.logprobs * rollout.mask, atol=1e-5)


def test_the_policy_as_its_own_reference_is_read_once_and_its_kl_is_zero(monkeypatch):
    """Evaluating the initial policy: π_ref is π_θ, so the reference's log-probs are the policy's own, without a
    second forward pass; a copy of the same weights is still read on its own."""
    model = build_tiny_causal()
    tokenizer = word_tokenizer()
    from rlhfkit.models.policy import prepare_tokenizer

    prepare_tokenizer(tokenizer, model)
    read = []
    own = Reference.logprobs
    monkeypatch.setattr(Reference, "logprobs", lambda self, *args: read.append(self) or own(self, *args))
    for reference, reads in ((Reference.frozen(model), 0), (Reference(model), 1)):
        read.clear()
        rollout = collect_rollout(Actor(model, value_head=False), reference, tokenizer, PROMPTS, LENGTH,
                                  SamplingDistribution(0.7), max_new_tokens=6, n_per_prompt=2)
        assert len(read) == reads
        assert torch.equal(rollout.logprobs, rollout.ref_logprobs)


def test_sampled_tokens_follow_the_temperature_distribution_not_top_k():
    """With top-k 1 in the model's generation_config, sampling would be greedy; rollouts must sample."""
    model = build_tiny_causal()
    model.generation_config.top_k = 1
    rollout, _ = rollout_for(model, n=8, temperature=1.0)
    assert len(set(rollout.completions)) > 1


def test_lora_reference_is_the_base_model_with_the_adapter_off():
    model = build_tiny_causal()
    base_rollout, _ = rollout_for(model, value_head=False)
    lora = add_lora(build_tiny_causal(), r=4)
    with torch.no_grad():  # make the adapter matter
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    reference = Reference(lora)
    assert reference.shared
    ref = reference.logprobs(base_rollout.batch, SamplingDistribution(0.7))
    assert torch.allclose(ref * base_rollout.mask, base_rollout.ref_logprobs * base_rollout.mask, atol=1e-5)
    policy = Actor(lora, value_head=False)(base_rollout.batch, SamplingDistribution(0.7))[0]
    assert not torch.allclose(policy * base_rollout.mask, ref * base_rollout.mask, atol=1e-3)


def test_min_new_tokens_is_part_of_the_distribution_that_log_probs_use():
    """EOS forbidden before min_new_tokens in sampling must be forbidden in the log-probs too."""
    model = build_tiny_causal()
    tokenizer = word_tokenizer()
    from rlhfkit.models.policy import prepare_tokenizer

    prepare_tokenizer(tokenizer, model)
    sampling = SamplingDistribution(1.0, min_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
    actor = Actor(model, value_head=False)
    rollout = collect_rollout(actor, Reference(model), tokenizer, PROMPTS, LENGTH, sampling, max_new_tokens=6,
                              n_per_prompt=4)
    assert rollout.mask.sum(dim=1).tolist() == [6.0] * 12  # fixed length: no early EOS
    plain, _, _ = actor(rollout.batch, SamplingDistribution(1.0))
    assert (rollout.logprobs > plain).all()  # the EOS mass is redistributed over the other tokens
    _, entropy, _ = actor(rollout.batch, sampling)
    assert torch.isfinite(entropy).all()


def test_rollouts_ignore_a_hostile_generation_config_of_the_model():
    """Samples, log-probs and KL come from plain temperature sampling, whatever the checkpoint's
    generation_config says (no_repeat_ngram_size, suppress_tokens, bad_words_ids, min_new_tokens, beams)."""
    torch.manual_seed(0)
    plain, _ = rollout_for(build_tiny_causal(), n=8, temperature=1.0)
    torch.manual_seed(0)
    hostile, _ = rollout_for(make_generation_config_hostile(build_tiny_causal()), n=8, temperature=1.0)
    assert torch.equal(hostile.batch.completion_ids, plain.batch.completion_ids)
    assert torch.allclose(hostile.logprobs, plain.logprobs)
    # and plain sampling does what the hostile settings forbid: repeat tokens, sample suppressed ones
    ids = hostile.batch.completion_ids[hostile.batch.completion_mask.bool()]
    assert torch.isin(ids, torch.tensor([4, 5, 6, 7, 8])).any()
    assert any(len(set(row)) < len(row) for row in hostile.batch.completion_ids.tolist())


def test_a_prompt_longer_than_the_model_positions_is_refused_by_name():
    tokenizer = word_tokenizer()
    model = build_tiny_causal()  # 128 positions
    long_prompt = " ".join(["bike"] * 125)
    with pytest.raises(ValueError, match=r"has 125 tokens; the model's 128 positions leave room for 122"):
        collect_rollout(Actor(model, value_head=False), Reference(model), tokenizer, [long_prompt], LENGTH,
                        max_new_tokens=6)
