"""A GPT-2 reward model's last block at the scored token only: the same scores and gradients as the full
forward, used in training where it applies, and never for models it does not cover."""

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from conftest import TOPICS, build_tiny_reward_backbone, synthetic_pairs, word_tokenizer
from rlhfkit.reward import final_token
from rlhfkit.reward.model import RewardModel, RewardModelConfig, train_reward_model


def tiny_gpt2_classifier(**config_kwargs) -> GPT2ForSequenceClassification:
    """In training mode, without dropout: two ways of computing see the same function."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=60, n_layer=3, n_head=2, n_embd=32, n_positions=64, num_labels=1,
                        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **config_kwargs)
    return GPT2ForSequenceClassification(config)


def right_padded_batch() -> dict[str, torch.Tensor]:
    """Four rows of 12, 8, 3 and 12 tokens."""
    torch.manual_seed(1)
    ids = torch.randint(1, 60, (4, 12))
    mask = torch.ones_like(ids)
    for row, length in ((1, 8), (2, 3)):
        ids[row, length:], mask[row, length:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("config_kwargs", [{}, {"scale_attn_by_inverse_layer_idx": True},
                                           {"scale_attn_weights": False}])
def test_scores_and_gradients_are_the_full_forwards(config_kwargs):
    model, batch = tiny_gpt2_classifier(**config_kwargs), right_padded_batch()
    assert final_token.covers(model)
    full = model(**batch).logits
    full.sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast = final_token.final_token_rewards(model, batch)
    fast.sum().backward()
    assert torch.allclose(fast, full, atol=1e-6)
    for p, full_grad in zip(model.parameters(), full_grads, strict=True):
        assert torch.allclose(p.grad, full_grad, atol=1e-6)


def test_under_bf16_autocast_the_scores_are_the_eager_forwards():
    model, batch = tiny_gpt2_classifier(), right_padded_batch()
    model.set_attn_implementation("eager")  # as rlhfkit trains under bf16 on a CPU (models/kernels.py)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, fast = model(**batch).logits, final_token.final_token_rewards(model, batch)
    assert fast.dtype == full.dtype == torch.bfloat16
    assert torch.equal(fast, full)


def test_the_scored_token_is_the_last_one_that_is_not_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9], [0, 0, 5, 6, 0]])
    assert final_token.last_non_pad(ids, 0).tolist() == [2, 4, 3]


@pytest.mark.parametrize("model", [
    build_tiny_reward_backbone(),  # BERT: scored at its first token, through a pooler
    tiny_gpt2_classifier(reorder_and_upcast_attn=True),
    tiny_gpt2_classifier(add_cross_attention=True),
], ids=["bert", "gpt2-reorder-and-upcast", "gpt2-cross-attention"])
def test_models_it_does_not_cover_keep_their_full_forward(model):
    assert not final_token.covers(model)


def test_a_gpt2_reward_model_scores_and_trains_through_it_where_it_applies(monkeypatch):
    tokenizer = word_tokenizer()
    model = tiny_gpt2_classifier()
    model.resize_token_embeddings(len(tokenizer))
    rm = RewardModel(model, tokenizer, max_length=48)
    prompts, completions = ["how do i fix my bike"] * 2, ["please fix it", "go away you idiot"]
    encoded = tokenizer(prompts, completions, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(rm.raw_rewards(prompts, completions), model(**encoded).logits[:, 0], atol=1e-6)
    calls = []
    original = final_token.final_token_rewards
    monkeypatch.setattr(final_token, "final_token_rewards", lambda m, e: calls.append(len(e["input_ids"])) or
                        original(m, e))
    config = RewardModelConfig(max_length=48, epochs=1, batch_size=2, eval_fraction=0.0, normalize=False,
                               precision="fp32")
    train_reward_model(synthetic_pairs(TOPICS[:4]), config, reward_model=rm, progress=False)
    assert len(calls) == 2  # one per training step: 4 prompts, 2 per step
