"""Mixed precision: which precision a setting resolves to on which hardware, and what training under bf16
autocast keeps exact (ratio 1 and KL 0 before the first update, fp32 log-probs and master weights)."""

import pytest
import torch

from conftest import build_tiny_causal, invoke, save_tiny_policy, word_tokenizer
from rlhfkit.config import FieldError
from rlhfkit.data.records import PreferencePair
from rlhfkit.models.policy import completion_logits, token_logprobs
from rlhfkit.precision import cpu_flags, resolve_precision
from rlhfkit.reward.base import FunctionReward
from rlhfkit.rl.dpo import DPOConfig, DPOTrainer
from rlhfkit.rl.grpo import GRPOConfig, GRPOTrainer
from rlhfkit.rl.ppo import PPOConfig, PPOTrainer

CPU = torch.device("cpu")
PROMPTS = ["how do i fix bike", "write code please", "plan day", "help you", "bake cake", "email"]
REWARD = FunctionReward(lambda p, c: sum(w in {"happy", "kind", "glad"} for w in c.split()) / 8)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU reported as having AVX512-BF16 (on a CPU without it, bf16 runs emulated)."""
    monkeypatch.setattr("rlhfkit.precision.cpu_flags", lambda: {"avx512f", "avx512_bf16"})


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr("rlhfkit.precision.cpu_flags", lambda: {"avx2", "avx512f"})


@pytest.mark.parametrize(("flags", "setting", "dtype", "said"), [
    ({"amx_bf16", "avx512_bf16"}, "auto", torch.bfloat16, "bf16 autocast (AMX-BF16 detected)"),
    ({"avx512_bf16"}, "auto", torch.bfloat16, "bf16 autocast (AVX512-BF16 detected)"),
    ({"avx512_bf16"}, "bf16", torch.bfloat16, "bf16 autocast (AVX512-BF16 detected)"),
    ({"avx512_bf16"}, "fp32", None, "fp32 (as configured)"),
    ({"avx2", "avx512f"}, "auto", None, "fp32 (no bf16 unit on this cpu)"),
    (set(), "fp32", None, "fp32 (as configured)"),
])
def test_auto_is_bf16_where_the_cpu_has_a_bf16_unit_and_fp32_is_fp32_everywhere(flags, setting, dtype, said):
    precision = resolve_precision(setting, CPU, flags)
    assert precision.dtype == dtype and str(precision) == said


def test_bf16_on_a_cpu_without_a_bf16_unit_is_one_line_naming_the_field_and_the_way_out():
    with pytest.raises(FieldError, match=r"field 'precision': bf16 needs a CUDA GPU with bf16 or a CPU with AMX-BF16 "
                                         r"or AVX512-BF16; this cpu has none .*: use auto or fp32$"):
        resolve_precision("bf16", CPU, {"avx2", "avx512f"})


def test_cpu_flags_are_read_from_the_flags_line_and_are_empty_without_cpuinfo(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: a CPU\nflags\t\t: fpu sse2 amx_bf16 avx512_bf16\n")
    assert cpu_flags(tmp_path / "cpuinfo") == {"fpu", "sse2", "amx_bf16", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_matrix_products_run_in_bf16_inside_the_autocast_and_in_fp32_outside_or_at_fp32():
    a = torch.randn(4, 4)
    with resolve_precision("bf16", CPU, {"avx512_bf16"}).autocast():
        assert (a @ a).dtype == torch.bfloat16
    assert (a @ a).dtype == torch.float32
    with resolve_precision("fp32", CPU, {"avx512_bf16"}).autocast():
        assert (a @ a).dtype == torch.float32


def logits_dtypes(trainer) -> list[torch.dtype]:
    """The dtype of every logits tensor the policy's head produces from now on."""
    seen = []
    trainer.actor.model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


def test_under_bf16_the_ratio_is_one_and_the_kl_zero_before_the_first_update(bf16_cpu, tmp_path):
    config = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=6, precision="bf16",
                       output_dir=str(tmp_path))  # two minibatches: the rollout reads the policy's log-probs itself
    trainer = PPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)
    seen = logits_dtypes(trainer)
    rollout = trainer.rollout(trainer.prompts_for_step(0))
    logprobs, _, values = trainer.actor(rollout.batch, trainer.sampling)  # the update's pass, with gradients
    assert set(seen) == {torch.bfloat16}  # sampling, scoring and the update all ran in bf16
    assert logprobs.dtype == values.dtype == rollout.logprobs.dtype == rollout.ref_logprobs.dtype == torch.float32
    mask = rollout.mask.bool()
    ratio = torch.exp(logprobs - rollout.logprobs)[mask]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    assert torch.allclose(rollout.logprobs[mask], rollout.ref_logprobs[mask], atol=1e-5)  # KL 0
    history = [trainer.train_step()]
    assert history[0]["kl/kl"] == pytest.approx(0.0, abs=1e-4)


def test_a_short_grpo_run_under_bf16_has_finite_losses_and_moves_the_fp32_master_weights(bf16_cpu, tmp_path):
    config = GRPOConfig(steps=3, batch_size=4, group_size=2, lr=1e-3, max_new_tokens=6, precision="bf16",
                        output_dir=str(tmp_path))
    trainer = GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)
    before = [p.detach().clone() for p in trainer.actor.parameters()]
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss/policy"])) for h in history)
    assert {p.dtype for p in trainer.actor.parameters()} == {torch.float32}
    assert sum(not torch.equal(a, b) for a, b in zip(before, trainer.actor.parameters(), strict=True)) > 0


def test_dpo_under_bf16_starts_at_margin_zero_and_trains_with_finite_losses(bf16_cpu, tmp_path):
    pairs = [PreferencePair(prompt=f"how do i {t}", chosen="happy kind glad", rejected="idiot stupid dumb",
                            prompt_id=t) for t in ("fix bike", "plan day", "bake cake", "write code")]
    trainer = DPOTrainer(DPOConfig(lr=1e-3, epochs=2, batch_size=4, precision="bf16", output_dir=str(tmp_path)),
                         build_tiny_causal(), word_tokenizer())
    seen = logits_dtypes(trainer)
    history = trainer.train(pairs, eval_pairs=pairs[:2], progress=False)
    assert torch.bfloat16 in seen
    assert history[0]["eval/margin"] == pytest.approx(0.0, abs=1e-5)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history if "loss" in h)


def test_fp32_runs_no_autocast_its_log_probs_are_the_plain_computation(bf16_cpu, tmp_path):
    config = GRPOConfig(batch_size=2, group_size=2, max_new_tokens=6, precision="fp32", output_dir=str(tmp_path))
    trainer = GRPOTrainer(config, build_tiny_causal(), word_tokenizer(), REWARD, PROMPTS)
    seen = logits_dtypes(trainer)
    rollout = trainer.rollout(trainer.prompts_for_step(0))
    logprobs = trainer.actor(rollout.batch, trainer.sampling)[0]
    assert set(seen) == {torch.float32}
    with torch.no_grad():
        plain = token_logprobs(completion_logits(trainer.actor.model, rollout.batch)[0], rollout.batch.completion_ids,
                               trainer.sampling)[0]
    assert torch.equal(logprobs.detach(), plain) and torch.equal(rollout.ref_logprobs, plain)


def test_the_command_line_says_the_precision_and_refuses_bf16_without_a_unit_in_one_line(plain_cpu, tmp_path,
                                                                                           monkeypatch):
    (tmp_path / "length_reward.py").write_text("def score(prompt, completion):\n    return len(completion) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "prompts.txt").write_text("how do i fix bike\nplan day\n")
    policy = save_tiny_policy(tmp_path / "policy")
    common = ["--policy", policy, "--prompts", tmp_path / "prompts.txt", "--reward", "python:length_reward:score",
              "--steps", 1]
    refused = invoke("grpo", *common, "--output-dir", tmp_path / "bf16", "--precision", "bf16")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "error: field 'precision': bf16 needs a CUDA GPU with bf16" in refused.output
    ran = invoke("grpo", *common, "--output-dir", tmp_path / "fp32", "--precision", "fp32")
    assert ran.exit_code == 0, ran.output
    assert "precision: fp32 (as configured)" in ran.output


@pytest.mark.parametrize(("precision", "expected"), [
    ("bf16", "field 'precision': bf16 needs a CUDA GPU with bf16 or a CPU with AMX-BF16 or AVX512-BF16; this cpu has "
             "none (bf16 would be emulated): use auto or fp32"),
    ("half", "field 'precision': Input should be 'auto', 'bf16' or 'fp32' (got 'half')"),
])
def test_the_demo_refuses_a_precision_it_cannot_run_before_anything_loads(plain_cpu, tmp_path, precision, expected):
    result = invoke("demo", "--run-dir", tmp_path / "run", "--precision", precision)
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "run").exists()


def linear_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """The dtype of every nn.Linear output of ``model`` from now on."""
    seen = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize(("precision", "dtypes"), [("bf16", {torch.bfloat16}), ("fp32", {torch.float32})])
def test_reward_model_training_runs_its_forward_in_the_precision_and_scores_in_fp32_afterwards(
        bf16_cpu, precision, dtypes):
    from conftest import build_tiny_reward_backbone, minilm_tokenizer, synthetic_pairs
    from rlhfkit.reward.model import RewardModel, RewardModelConfig, train_reward_model

    pairs = synthetic_pairs(["fix a bike", "bake bread", "plan a trip", "learn chess"])
    backbone = build_tiny_reward_backbone()
    seen = linear_dtypes(backbone)
    weights = backbone.classifier.weight.detach().clone()
    steps = []
    rm = train_reward_model(pairs, RewardModelConfig(epochs=1, batch_size=4, lr=1e-3, precision=precision,
                                                     normalize=False),
                            reward_model=RewardModel(backbone, minilm_tokenizer()), eval_pairs=pairs[:2],
                            progress=False, on_step=steps.append)
    # the training steps in ``precision``; the held-out evaluation scores in fp32, as the saved model will
    assert set(seen) == dtypes | {torch.float32} and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert not torch.equal(rm.model.classifier.weight, weights) and rm.model.classifier.weight.dtype == torch.float32
    seen.clear()
    rm(["How do I fix a bike?"], ["Start small."])  # once trained, it scores as it will once saved: fp32
    assert set(seen) == {torch.float32}


@pytest.mark.parametrize(("precision", "dtypes"), [("bf16", {torch.bfloat16}), ("fp32", {torch.float32})])
def test_sft_runs_its_forward_in_the_precision_with_fp32_master_weights(bf16_cpu, tmp_path, precision, dtypes):
    from rlhfkit.cai.sft import SFTConfig, train_sft

    model = build_tiny_causal()
    seen = linear_dtypes(model)
    examples = [("how do i fix bike", "happy kind glad"), ("plan day", "glad kind happy")] * 2
    model, metrics = train_sft(model, word_tokenizer(), examples, SFTConfig(epochs=1, batch_size=2, lr=1e-3,
                                                                           precision=precision), progress=False)
    # the training steps in ``precision``; the loss before and after is measured in fp32 either way
    assert set(seen) == dtypes | {torch.float32} and all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.tensor(metrics["loss_after"]))
