"""Trends on a tiny policy and a programmatic reward: each algorithm must clearly raise the reward
while the KL to the reference stays bounded; DPO must raise the held-out chosen-over-rejected margin."""

import itertools
import json
import random
from functools import partial

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import build_tiny_causal, build_tiny_seq2seq, word_tokenizer
from rlhfkit.data.io import DataError
from rlhfkit.data.order import epoch_order
from rlhfkit.data.records import PreferencePair
from rlhfkit.reward.base import FunctionReward
from rlhfkit.rl.dpo import DPOConfig, DPOTrainer
from rlhfkit.rl.grpo import GRPOConfig, GRPOTrainer, rloo_config
from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

KIND = {"happy", "kind", "nice", "good", "love", "glad"}
PROMPTS = ["how do i fix bike", "write code please", "plan day", "help you", "bake cake", "email"]
REWARD = FunctionReward(lambda p, c: sum(w in KIND for w in c.split()) / max(len(c.split()), 1))


def mean(history, key, part):
    values = [h[key] for h in history]
    chosen = values[:5] if part == "first" else values[-5:]
    return sum(chosen) / len(chosen)


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_ppo_raises_reward_with_bounded_kl(family, tmp_path):
    model = build_tiny_causal() if family == "causal" else build_tiny_seq2seq()
    config = PPOConfig(steps=30, batch_size=16, minibatch_size=8, ppo_epochs=2, lr=3e-3, max_new_tokens=8,
                       kl_coef=0.1, lam=1.0, output_dir=str(tmp_path))
    history = PPOTrainer(config, model, word_tokenizer(), REWARD, PROMPTS).train()
    before, after = mean(history, "reward/score", "first"), mean(history, "reward/score", "last")
    print(f"{family} PPO reward {before:.3f} -> {after:.3f}, KL {mean(history, 'kl/kl', 'last'):.2f}")
    assert after > before + 0.15
    assert mean(history, "kl/kl", "last") < 15.0  # nats per 8-token sequence
    assert {"loss/policy", "loss/value", "policy/entropy", "policy/clipfrac", "policy/approx_kl",
            "value/explained_variance", "response/length", "reward/total"} <= set(history[-1])
    assert (tmp_path / "policy" / "ppo_config.yaml").exists()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("make_config", [GRPOConfig, rloo_config, partial(rloo_config, action="completion")],
                         ids=["grpo", "rloo", "rloo-completion"])
def test_group_methods_raise_reward_with_bounded_kl(make_config, tmp_path):
    config = make_config(steps=30, batch_size=8, group_size=4, lr=3e-3, max_new_tokens=8, output_dir=str(tmp_path))
    history = GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS).train()
    before, after = mean(history, "reward/score", "first"), mean(history, "reward/score", "last")
    print(f"{config.advantage} reward {before:.3f} -> {after:.3f}, KL {mean(history, 'kl/kl', 'last'):.2f}")
    assert after > before + 0.2
    assert mean(history, "kl/kl", "last") < 15.0


def test_adaptive_kl_coefficient_follows_the_measured_kl_in_training(tmp_path):
    config = PPOConfig(steps=12, batch_size=16, minibatch_size=8, ppo_epochs=2, lr=3e-3, max_new_tokens=8, lam=1.0,
                       kl_coef=0.05, kl_target=0.5, kl_horizon=50, output_dir=str(tmp_path))
    history = PPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS).train()
    for now, after in itertools.pairwise(history):
        # β grows after a rollout whose KL exceeded the target and shrinks after one below it
        assert (after["kl/coef"] > now["kl/coef"]) == (now["kl/kl"] > 0.5)


def test_reward_threshold_stops_early(tmp_path):
    config = PPOConfig(steps=50, batch_size=16, minibatch_size=8, ppo_epochs=2, lr=3e-3, max_new_tokens=8,
                       kl_coef=0.05, lam=1.0, reward_threshold=0.4, output_dir=str(tmp_path))
    trainer = PPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)
    history = trainer.train()
    assert len(history) < 50 and history[-1]["reward/score"] >= 0.4
    assert "threshold" in trainer.stop_reason
    # resumed from the checkpoint of the step where it stopped, it stops there again without a step more
    trainer.save_checkpoint(tmp_path / "stopped")
    resumed = PPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)
    resumed.load_checkpoint(tmp_path / "stopped")
    assert len(resumed.train()) == len(history) and "threshold" in resumed.stop_reason


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_resumed_run_matches_an_uninterrupted_one(algorithm, tmp_path):
    def make(output):
        if algorithm == "ppo":
            config = PPOConfig(steps=4, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=3e-3, max_new_tokens=6,
                               kl_target=1.0, kl_horizon=100, output_dir=str(output))
            return PPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)
        config = GRPOConfig(steps=4, batch_size=4, group_size=3, lr=3e-3, max_new_tokens=6, output_dir=str(output))
        return GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)

    straight = make(tmp_path / "a")
    full = straight.train()
    first = make(tmp_path / "b")
    first.config.steps = 2
    first.train()
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = make(tmp_path / "c")
    resumed.load_checkpoint(tmp_path / "ckpt")
    rest = resumed.train()
    keys = ("reward/score", "kl/kl", "loss/policy")
    assert [[round(h[k], 5) for k in keys] for h in rest] == [[round(h[k], 5) for k in keys] for h in full]
    for (name, a), b in zip(straight.actor.named_parameters(), resumed.actor.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name



def tiny_grpo(output) -> GRPOTrainer:
    config = GRPOConfig(steps=1, batch_size=2, group_size=2, max_new_tokens=3, output_dir=str(output))
    return GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)


def test_a_checkpoint_or_policy_cut_short_while_saving_leaves_nothing_that_looks_done(tmp_path, monkeypatch):
    trainer = tiny_grpo(tmp_path)
    trainer.train()
    trainer.save_checkpoint(tmp_path / "ckpt")
    trainer.step = 7

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies here, e.g. kill -9 or out of disk

    monkeypatch.setattr(GRPOTrainer, "rng_state", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path / "ckpt-7")
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path / "ckpt")  # over an older checkpoint: the older one stays whole
    monkeypatch.setattr(type(trainer.tokenizer), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_policy(tmp_path / "policy-new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "policy", "tensorboard"]  # no partial folder
    resumed = tiny_grpo(tmp_path / "b")
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.step == 1



def test_a_folder_named_like_the_policy_that_rlhfkit_did_not_write_is_never_replaced(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"policy: exists and is not a policy or checkpoint saved by rlhfkit"):
        tiny_grpo(tmp_path)
    (tmp_path / "other" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "other" / "checkpoint-1" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"checkpoint-1: exists and is not"):
        tiny_grpo(tmp_path / "other").save_checkpoint(tmp_path / "other" / "checkpoint-1")
    assert (tmp_path / "policy" / "notes.txt").exists() and (tmp_path / "other" / "checkpoint-1" / "notes.txt").exists()


@pytest.mark.parametrize(("name", "damage"), [
    *[(name, "truncated") for name in ("trainable.safetensors", "optimizer.pt", "trainer_state.json", "rng-0.pt")],
    *[(name, "missing") for name in ("trainable.safetensors", "optimizer.pt", "rng-0.pt")],
])
def test_a_damaged_checkpoint_file_is_named_when_resuming(tmp_path, name, damage):
    trainer = tiny_grpo(tmp_path)
    trainer.save_checkpoint(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / name
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match=rf"ckpt/{name}: (missing from the checkpoint|cannot be read .* damaged)"):
        tiny_grpo(tmp_path / "b").load_checkpoint(tmp_path / "ckpt")


def test_a_checkpoint_of_another_model_size_is_named_on_resume(tmp_path):
    tiny_grpo(tmp_path).save_checkpoint(tmp_path / "ckpt")
    wider = GPT2LMHeadModel(GPT2Config(**build_tiny_causal().config.to_diff_dict() | {"n_embd": 64}))
    config = GRPOConfig(steps=1, batch_size=2, group_size=2, max_new_tokens=3, output_dir=str(tmp_path / "b"))
    trainer = GRPOTrainer(config, wider, word_tokenizer(), REWARD, PROMPTS)
    with pytest.raises(DataError, match=r"trainable.safetensors: weight '.*' is \[96\] in the checkpoint but "
                                        r"\[192\] in this policy"):
        trainer.load_checkpoint(tmp_path / "ckpt")



@pytest.mark.parametrize(("prompts", "reward", "expected"), [
    ("how do i fix bike", REWARD, r"prompts must be a list of prompts, got a str"),
    (["fix bike", "  "], REWARD, r"prompts\[1\]: .*the prompt is empty or blank"),
    (["fix bike"], "judge:sentiment", r"reward_fn must be callable .* rlhfkit.reward.spec.load_reward"),
])
def test_a_trainer_built_in_python_refuses_inputs_that_cannot_train_by_name(tmp_path, prompts, reward, expected):
    config = GRPOConfig(batch_size=2, group_size=2, output_dir=str(tmp_path))
    with pytest.raises((TypeError, ValueError), match=expected):
        GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), reward, prompts)



def test_a_policy_whose_generation_config_transformers_would_refuse_to_save_is_saved_as_it_was(tmp_path):
    policy = build_tiny_causal()
    policy.generation_config.use_cache, policy.generation_config.cache_implementation = False, "static"
    policy.generation_config.top_p = 0.5  # without do_sample: transformers refuses to save this
    config = GRPOConfig(steps=1, batch_size=2, group_size=2, max_new_tokens=3, output_dir=str(tmp_path))
    GRPOTrainer(config, policy, word_tokenizer(), REWARD, PROMPTS).train()
    saved = json.loads((tmp_path / "policy" / "generation_config.json").read_text())
    assert saved["cache_implementation"] == "static" and saved["top_p"] == 0.5
    assert (tmp_path / "policy" / "model.safetensors").exists()


def pairs_for(topics, seed):
    rng = random.Random(seed)
    good, bad = sorted(KIND), ["stupid", "idiot", "dumb", "hate", "bad", "useless"]
    return [PreferencePair(prompt=f"how do i {t}", chosen=" ".join(rng.choices(good, k=4)),
                           rejected=" ".join(rng.choices(bad, k=4)), prompt_id=t) for t in topics for _ in range(4)]


@pytest.mark.parametrize("build", [build_tiny_causal, build_tiny_seq2seq], ids=["causal", "seq2seq"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_raises_the_held_out_margin(build, lora, tmp_path):
    config = DPOConfig(lr=1e-2 if lora else 1e-3, epochs=6 if lora else 3, batch_size=8, lora=lora,
                       output_dir=str(tmp_path))
    trainer = DPOTrainer(config, build(), word_tokenizer())
    assert trainer.reference.shared == lora
    history = trainer.train(pairs_for(["fix bike", "write code", "plan day", "bake cake", "help you"], 0),
                            eval_pairs=pairs_for(["email", "garden"], 1), progress=False)
    before, after = history[0], history[-1]
    assert before["eval/margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert after["eval/margin"] > 0.1 and after["eval/accuracy"] >= 0.75
    trainer.save_policy()
    assert (tmp_path / "policy" / "dpo_config.yaml").exists()


@pytest.mark.parametrize("epochs", [1, 2])
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_an_update_reusing_its_first_pass_as_the_old_policy_equals_the_two_pass_update(algorithm, epochs, tmp_path):
    """When one minibatch holds the rollout, the rollout skips the policy's pass and the update's first pass gives
    π_θ_old's log-probs and values (the second epoch reads the policy again); the update must not change."""
    import copy

    from rlhfkit.rollout import collect_rollout

    def make():
        if algorithm == "ppo":
            config = PPOConfig(batch_size=8, minibatch_size=8, ppo_epochs=epochs, lr=3e-3, max_new_tokens=6,
                               output_dir=str(tmp_path))
            return PPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)
        config = GRPOConfig(batch_size=4, group_size=2, epochs=epochs, lr=3e-3, max_new_tokens=6,
                            output_dir=str(tmp_path))
        return GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)

    two_pass, one_pass = make(), make()
    assert two_pass.one_minibatch
    full = collect_rollout(two_pass.actor, two_pass.reference, two_pass.tokenizer, two_pass.prompts_for_step(0),
                           REWARD, two_pass.sampling, 6, two_pass.samples_per_prompt, policy_logprobs=True)
    skipped = copy.copy(full)
    skipped.logprobs, skipped.values = None, None
    stats_two, stats_one = two_pass.update(full), one_pass.update(skipped)
    for key in stats_two:
        assert stats_one[key] == pytest.approx(stats_two[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(two_pass.actor.parameters(), one_pass.actor.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_each_epoch_visits_every_prompt_once_in_a_seeded_order(tmp_path):
    prompts = [f"how do i {w}" for w in ("fix bike", "write code", "plan day", "bake cake", "help you", "email")]
    config = GRPOConfig(batch_size=3, group_size=2, output_dir=str(tmp_path))
    trainer = GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, prompts)
    epoch0 = trainer.prompts_for_step(0) + trainer.prompts_for_step(1)
    epoch1 = trainer.prompts_for_step(2) + trainer.prompts_for_step(3)
    assert sorted(epoch0) == sorted(prompts) == sorted(epoch1) and epoch0 != epoch1
    again = GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, prompts)
    assert again.prompts_for_step(3) == trainer.prompts_for_step(3)  # a function of the step alone


def test_no_two_seeds_share_an_epochs_prompt_order():
    """Seeded seed + epoch, seed s's epoch 1 was seed s + 1's epoch 0: the demo's seeds 0, 1, 2 ran the same
    prompt sequence shifted by an epoch. Epoch 0 stays torch.randperm seeded with the seed (TRL's order)."""
    orders = {seed: [epoch_order(72, seed, epoch) for epoch in range(13)] for seed in range(3)}
    drawn = [tuple(order) for by_epoch in orders.values() for order in by_epoch]
    assert len(set(drawn)) == len(drawn) == 39
    assert orders[1][0] == torch.randperm(72, generator=torch.Generator().manual_seed(1)).tolist()
    assert orders[0][1] != orders[1][0] and orders[0][2] != orders[2][0]


def test_a_prompt_too_long_for_the_model_is_refused_before_training(tmp_path):
    prompts = [*PROMPTS, " ".join(["cake"] * 130)]
    with pytest.raises(ValueError, match="has 130 tokens; the model's 128 positions leave room for 120"):
        PPOTrainer(PPOConfig(max_new_tokens=8, output_dir=str(tmp_path)), build_tiny_causal(), word_tokenizer(),
                   REWARD, prompts)


@pytest.mark.parametrize("make", ["ppo", "grpo"])
def test_a_non_finite_reward_stops_training_with_the_step_and_the_sample_and_saves_nothing(make, tmp_path):
    from rlhfkit.reward.base import RewardError

    reward = FunctionReward(lambda p, c: float("nan") if len(c.split()) > 2 else 1.0, name="flaky")
    if make == "ppo":
        config = PPOConfig(steps=3, batch_size=4, minibatch_size=4, max_new_tokens=6, output_dir=str(tmp_path))
        trainer = PPOTrainer(config, build_tiny_causal(), word_tokenizer(), reward, PROMPTS)
    else:
        config = GRPOConfig(steps=3, batch_size=2, group_size=2, max_new_tokens=6, output_dir=str(tmp_path))
        trainer = GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), reward, PROMPTS)
    with pytest.raises(RewardError, match=rf"{make} stopped at step 1: reward 'flaky' gave nan for completion \d+"):
        trainer.train()
    assert not (tmp_path / "policy").exists()


def test_a_non_finite_loss_stops_training_before_the_weights_take_it_in(tmp_path):
    from rlhfkit.models.update import TrainingDiverged

    config = GRPOConfig(steps=3, batch_size=2, group_size=2, max_new_tokens=6, output_dir=str(tmp_path))
    trainer = GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)
    before = [p.detach().clone() for p in trainer.actor.parameters()]
    # NaN logits in the update's forward pass only (sampling runs without gradients)
    head = trainer.actor.model.lm_head
    head.register_forward_hook(lambda m, i, out: out * float("nan") if torch.is_grad_enabled() else out)
    with pytest.raises(TrainingDiverged, match=r"grpo stopped at step 1: loss nan, gradient norm nan: not finite"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.actor.parameters(), strict=True))
    assert not (tmp_path / "policy").exists()


def test_the_command_line_exits_non_zero_on_a_nan_reward_and_leaves_no_policy(tmp_path, monkeypatch):
    from conftest import invoke, save_tiny_policy

    (tmp_path / "nan_reward.py").write_text("def score(prompt, completion):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "prompts.txt").write_text("how do i fix bike\nplan day\n")
    result = invoke("grpo", "--policy", save_tiny_policy(tmp_path / "policy"), "--prompts", tmp_path / "prompts.txt",
                    "--reward", "python:nan_reward:score", "--output-dir", tmp_path / "run", "--steps", 2)
    assert result.exit_code == 1, result.output
    assert "grpo stopped at step 1: reward 'score' gave nan for completion 0" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "policy").exists()


@pytest.mark.parametrize(("weights_dtype", "changed"), [("float32", 0.8), ("bfloat16", None)])
def test_a_bf16_checkpoint_is_fine_tuned_with_float32_master_weights(weights_dtype, changed, tmp_path):
    """Small updates (lr 1e-5) round away in bf16 weights; fp32 master weights keep them, unless bf16 is asked."""
    model = build_tiny_causal().to(torch.bfloat16)
    initial = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    config = GRPOConfig(steps=3, batch_size=4, group_size=2, lr=1e-5, max_new_tokens=6, weights_dtype=weights_dtype,
                        output_dir=str(tmp_path))
    trainer = GRPOTrainer(config, model, word_tokenizer(), REWARD, PROMPTS)
    trainer.train()
    trained = dict(trainer.actor.model.named_parameters())
    assert {p.dtype for p in trained.values()} == {getattr(torch, weights_dtype)}
    moved = sum(int((trained[n].detach().float() != w).sum()) for n, w in initial.items())
    share = moved / sum(w.numel() for w in initial.values())
    print(f"{weights_dtype} weights: {share:.1%} changed after 3 steps at lr 1e-5")
    if changed is not None:
        assert share > changed
    else:
        assert share < 0.5
