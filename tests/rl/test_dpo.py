"""DPO's loss takes a pair's soft label, and its batches fit the model."""

import math

import pytest
import torch

from conftest import build_tiny_causal, word_tokenizer
from rlhfkit.data.records import PreferencePair
from rlhfkit.rl.dpo import DPOConfig, DPOTrainer, dpo_loss


def test_the_soft_target_loss_is_smallest_at_the_margin_that_matches_the_label():
    """−[y log σ(h) + (1 − y) log σ(−h)] is minimal at h = log(y / (1 − y)); a hard label pushes h up."""
    for y in (0.5, 0.7, 0.9):
        h = torch.tensor([math.log(y / (1 - y))], requires_grad=True)
        loss, _ = dpo_loss(h, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, labels=torch.tensor([y]))
        loss.backward()
        assert h.grad.abs().item() < 1e-6
    h = torch.zeros(1, requires_grad=True)
    dpo_loss(h, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0)[0].backward()
    assert h.grad.item() == pytest.approx(-0.5)


def test_pairs_labelled_one_half_teach_nothing(tmp_path):
    """At the start policy = reference (h = 0), where a 0.5 label's gradient σ(h) − y is zero."""
    pairs = [PreferencePair(prompt="how do i fix bike", chosen="happy kind nice", rejected="stupid dumb idiot",
                            label=0.5)] * 4
    trainer = DPOTrainer(DPOConfig(lr=1e-2, batch_size=4, max_steps=1, output_dir=str(tmp_path)),
                         build_tiny_causal(), word_tokenizer())
    before = [p.detach().clone() for p in trainer.actor.parameters()]
    trainer.train(pairs, eval_pairs=pairs[:1], progress=False)
    assert all(torch.allclose(a, b) for a, b in zip(before, trainer.actor.parameters(), strict=True))
    assert trainer.history[1]["grad_norm"] == 0  # the logged norm is the step's gradient's
    hard = DPOTrainer(DPOConfig(lr=1e-2, batch_size=4, max_steps=1, output_dir=str(tmp_path)), build_tiny_causal(),
                      word_tokenizer())
    hard.train([p.model_copy(update={"label": None}) for p in pairs], eval_pairs=pairs[:1], progress=False)
    assert hard.history[1]["grad_norm"] > 0
    assert not all(torch.allclose(a, b) for a, b in zip(before, hard.actor.parameters(), strict=True))


def test_a_prompt_longer_than_the_model_positions_is_cut_from_the_left_with_a_warning(tmp_path):
    long_prompt = " ".join(["bike"] * 200) + " how do i fix bike"
    pairs = [PreferencePair(prompt=long_prompt, chosen="happy kind nice", rejected="stupid dumb idiot")]
    trainer = DPOTrainer(DPOConfig(output_dir=str(tmp_path)), build_tiny_causal(), word_tokenizer())  # 128 positions
    with pytest.warns(UserWarning, match="2 of 2 prompts cut from the left to fit the model's 128 positions"):
        batch = trainer.batch(pairs)
    assert batch.prompt_ids.shape[1] + batch.completion_ids.shape[1] <= 128
    assert trainer.tokenizer.decode(batch.prompt_ids[0, -5:]) == "how do i fix bike"
    with pytest.warns(UserWarning):
        assert math.isfinite(trainer.evaluate(pairs)["margin"])


def test_an_answer_cut_at_the_generation_limit_gets_no_eos_in_a_dpo_batch_while_an_ended_one_does(tmp_path):
    """Same text, same length: only the answer that ended (EOS sampled) is trained to stop there."""
    pair = PreferencePair(prompt="how do i fix bike", chosen="happy kind nice", rejected="stupid dumb idiot")
    trainer = DPOTrainer(DPOConfig(output_dir=str(tmp_path)), build_tiny_causal(), word_tokenizer())
    eos = trainer.tokenizer.eos_token_id
    batch = trainer.batch([pair, pair.model_copy(update={"chosen_truncated": True, "rejected_truncated": True})])
    lengths = batch.completion_mask.sum(dim=1).tolist()
    last = [row[n - 1].item() for row, n in zip(batch.completion_ids, lengths, strict=True)]
    # rows: chosen (ended), chosen (cut), rejected (ended), rejected (cut)
    assert lengths == [4, 3, 4, 3]
    assert [token == eos for token in last] == [True, False, True, False]


def test_pairs_come_in_each_epochs_seeded_permutation_the_order_of_torchs_random_sampler(tmp_path):
    """Each epoch trains on its own seeded permutation (epoch_order, as the RL trainers draw their prompts); epoch 0
    is the order torch's RandomSampler (TRL's DPO sampler) gives at the same seed."""
    from torch.utils.data import RandomSampler

    from rlhfkit.data.order import epoch_order

    words = "happy kind nice good calm warm".split()
    pairs = [PreferencePair(prompt=f"how do i fix bike {w}", chosen=w, rejected="stupid dumb idiot") for w in words]
    trainer = DPOTrainer(DPOConfig(batch_size=2, epochs=2, eval_fraction=0.0, seed=7, output_dir=str(tmp_path)),
                         build_tiny_causal(), word_tokenizer())
    batched, batch = [], trainer.batch
    trainer.batch = lambda step_pairs: batched.extend(p.chosen for p in step_pairs) or batch(step_pairs)
    trainer.train(pairs, eval_pairs=[], progress=False)
    trained = batched[len(pairs):]  # after the reference's pass over every pair in the given order
    assert trained == [words[i] for i in epoch_order(6, 7, 0) + epoch_order(6, 7, 1)]
    assert epoch_order(512, 1234, 0) == list(RandomSampler(range(512), generator=torch.Generator().manual_seed(1234)))


def test_the_largest_seed_trains_every_epoch(tmp_path):
    """seed + epoch stays within what torch.Generator.manual_seed takes (2**64 - 1 passed the config and raised
    "Overflow when unpacking long long" at the second epoch's order, after the first epoch had trained)."""
    pairs = [PreferencePair(prompt=f"how do i fix bike {w}", chosen=w, rejected="stupid dumb idiot")
             for w in ("happy", "kind", "nice")]
    trainer = DPOTrainer(DPOConfig(batch_size=2, epochs=3, eval_fraction=0.0, seed=2**32 - 1,
                                   output_dir=str(tmp_path)), build_tiny_causal(), word_tokenizer())
    trainer.train(pairs, eval_pairs=[], progress=False)
    assert trainer.history[-1]["step"] == 6
    with pytest.raises(ValueError, match=r"field 'seed': must be in \[0, 2\*\*32\)"):
        DPOConfig(seed=2**64 - 1)


def test_max_steps_ends_the_epochs_too(tmp_path, monkeypatch):
    """epochs large and max_steps to stop: it drew an order for each of the epochs after the last step (10**6 of
    them: 10 s after a one-step run)."""
    import rlhfkit.rl.dpo as dpo

    drawn = []
    monkeypatch.setattr(dpo, "epoch_order", lambda n, seed, epoch: drawn.append(epoch) or list(range(n)))
    pairs = [PreferencePair(prompt="how do i fix bike", chosen=w, rejected="stupid dumb idiot")
             for w in ("happy", "kind")]
    trainer = DPOTrainer(DPOConfig(batch_size=1, epochs=10**6, max_steps=3, eval_fraction=0.0,
                                   output_dir=str(tmp_path)), build_tiny_causal(), word_tokenizer())
    trainer.train(pairs, eval_pairs=[], progress=False)
    assert drawn == [0, 1] and trainer.history[-1]["step"] == 3
