import json

import pytest
import torch

from conftest import (
    SPECIALS,
    TOPICS,
    build_tiny_causal,
    build_tiny_reward_backbone,
    invoke,
    minilm_tokenizer,
    save_tiny_policy,
    synthetic_pairs,
    word_tokenizer,
)
from rlhfkit.data.io import read_records, write_records
from rlhfkit.data.records import Completion, PreferencePair, Ranking


@pytest.fixture
def policy_dir(tmp_path):
    return save_tiny_policy(tmp_path / "policy")


@pytest.mark.parametrize("command", [[], ["generate"], ["pairs"], ["import-pairs"], ["reward", "train"],
                                     ["reward", "eval"], ["reward", "score"], ["demo"], ["ppo"], ["grpo"], ["rloo"],
                                     ["dpo"], ["evaluate"]])
def test_every_command_explains_itself(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_generate_rank_pairs_from_the_command_line(tmp_path, policy_dir):
    (tmp_path / "prompts.txt").write_text("how do i fix bike\n\nhow do i bake cake\n")
    out = tmp_path / "completions.jsonl"
    result = invoke("generate", tmp_path / "prompts.txt", "-o", out, "--model", policy_dir, "-n", 4,
                    "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    completions = read_records(out, Completion)
    assert [c.prompt_id for c in completions[::4]] == ["line-1", "line-3"]
    assert "0 new completions" in invoke("generate", tmp_path / "prompts.txt", "-o", out, "--model", policy_dir,
                                         "-n", 4, "--compile").output
    rankings = [Ranking(prompt_id=pid, labeler_id="l1", groups=[[f"{pid}-0"], [f"{pid}-1", f"{pid}-2"], [f"{pid}-3"]])
                for pid in ("line-1", "line-3")]
    write_records(tmp_path / "rankings.jsonl", rankings)
    result = invoke("pairs", tmp_path / "rankings.jsonl", "--completions", out, "-o", tmp_path / "pairs.jsonl")
    assert result.exit_code == 0, result.output
    assert len(read_records(tmp_path / "pairs.jsonl", PreferencePair)) == 10  # 5 per prompt: one tie


def test_bad_input_is_one_located_line_not_a_traceback(tmp_path):
    (tmp_path / "rankings.jsonl").write_text('{"prompt_id": "p", "labeler_id": "l", "groups": [["a"]]}\n{oops\n')
    write_records(tmp_path / "completions.jsonl", [Completion(id="a", prompt_id="p", prompt="q", text="t", index=0)])
    result = invoke("pairs", tmp_path / "rankings.jsonl", "--completions", tmp_path / "completions.jsonl",
                    "-o", tmp_path / "pairs.jsonl")
    assert result.exit_code == 1
    assert "rankings.jsonl:2: malformed JSON" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pairs.jsonl").exists()


def test_import_then_train_eval_and_score_a_reward_model(tmp_path):
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in synthetic_pairs(TOPICS[:12])]
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("import-pairs", tmp_path / "trl.jsonl", "--format", "trl", "-o", tmp_path / "pairs.jsonl")
    assert result.exit_code == 0, result.output
    backbone = tmp_path / "backbone"
    build_tiny_reward_backbone().save_pretrained(backbone)
    minilm_tokenizer().save_pretrained(backbone)
    (tmp_path / "rm.yaml").write_text("max_length: 48\nlr: 0.002\neval_fraction: 0.25\n")
    result = invoke("reward", "train", tmp_path / "pairs.jsonl", "-o", tmp_path / "rm",
                    "--config", tmp_path / "rm.yaml", "--backbone", backbone, "--epochs", 4, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "held-out accuracy" in result.output
    result = invoke("reward", "eval", tmp_path / "rm", tmp_path / "pairs.jsonl")
    assert result.exit_code == 0 and "accuracy=" in result.output
    completions = [Completion(id=f"c{i}", prompt_id="p", prompt="q", text=t, index=i)
                   for i, t in enumerate(["happy to help, lovely idea", "shut up you idiot"])]
    write_records(tmp_path / "c.jsonl", completions)
    for spec, key in ((tmp_path / "rm", "reward_model"), ("judge:profanity", "not_offensive")):
        result = invoke("reward", "score", tmp_path / "c.jsonl", "--reward", spec, "-o", tmp_path / "s.jsonl")
        assert result.exit_code == 0, result.output
        assert all(key in c.scores for c in read_records(tmp_path / "s.jsonl", Completion))


def test_unknown_config_field_is_reported(tmp_path):
    write_records(tmp_path / "pairs.jsonl", synthetic_pairs(TOPICS[:2]))
    (tmp_path / "rm.yaml").write_text("learning_rate: 0.1\n")
    result = invoke("reward", "train", tmp_path / "pairs.jsonl", "-o", tmp_path / "rm",
                    "--config", tmp_path / "rm.yaml")
    assert result.exit_code == 1 and "unknown RewardModelConfig fields ['learning_rate']" in result.output


def test_unknown_reward_spec_is_reported(tmp_path):
    write_records(tmp_path / "c.jsonl", [Completion(id="a", prompt_id="p", prompt="q", text="t", index=0)])
    result = invoke("reward", "score", tmp_path / "c.jsonl", "--reward", "judge:vibes", "-o", tmp_path / "s.jsonl")
    assert result.exit_code == 1 and "unknown judge 'vibes'" in result.output


def save_policy_that_ends_with_probability(path, p_eos: float):
    """A tiny policy whose next token is EOS with probability ``p_eos`` at every step, else one of the
    words (never another special token): the final layer norm outputs a constant h = e_0, and the tied
    embeddings give EOS the logit log(p_eos / (1 − p_eos) · #words), each word 0, the other specials −100."""
    model = build_tiny_causal()
    words, eos = model.config.vocab_size - len(SPECIALS), SPECIALS.index("<eos>")
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        wte = model.transformer.wte.weight
        wte[:, 0] = 0.0
        wte[:len(SPECIALS), 0] = -100.0
        wte[eos, 0] = torch.tensor(p_eos / (1 - p_eos) * words).log()
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def test_generate_marks_the_answers_cut_at_max_new_tokens(tmp_path):
    """An answer that used all max_new_tokens without EOS is marked truncated; one that ended is not."""
    policy = save_policy_that_ends_with_probability(tmp_path / "policy", 0.3)
    (tmp_path / "prompts.txt").write_text("how do i fix bike\nhow do i bake cake\n")
    out = tmp_path / "completions.jsonl"
    result = invoke("generate", tmp_path / "prompts.txt", "-o", out, "--model", policy, "-n", 8,
                    "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    completions = read_records(out, Completion)
    assert {c.truncated for c in completions} == {True, False}  # 0.7^4 ≈ 24% of 16 answers cut
    for c in completions:  # one word per token: a cut answer holds all 4, an ended one fewer (EOS took a step)
        assert c.truncated == (len(c.text.split()) == 4), c


def test_rl_commands_from_a_yaml_config_with_checkpoint_and_resume(tmp_path, policy_dir):
    (tmp_path / "prompts.txt").write_text("how do i fix bike\nwrite code please\nplan day\nhelp you\n")
    run = tmp_path / "run.yaml"
    run.write_text(f"policy: {policy_dir}\nprompts: {tmp_path / 'prompts.txt'}\nreward: judge:sentiment\n"
                   f"batch_size: 2\nmax_new_tokens: 4\nsave_every: 1\noutput_dir: {tmp_path / 'ppo'}\n")
    result = invoke("ppo", "--config", run, "--steps", 1, "--minibatch-size", 1)
    assert result.exit_code == 2  # PPO fields come from the YAML, not ad-hoc flags
    run.write_text(run.read_text() + "minibatch_size: 1\n")
    result = invoke("ppo", "--config", run, "--steps", 1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ppo" / "checkpoint-1" / "trainer_state.json").exists()
    assert (tmp_path / "ppo" / "policy" / "ppo_config.yaml").exists()
    result = invoke("ppo", "--config", run, "--steps", 2, "--resume", tmp_path / "ppo" / "checkpoint-1")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "step 2/2" in result.output and "step 1/2" not in result.output
    for algorithm in ("grpo", "rloo"):
        cfg = tmp_path / f"{algorithm}.yaml"
        cfg.write_text(f"policy: {policy_dir}\nprompts: {tmp_path / 'prompts.txt'}\nreward: judge:sentiment\n"
                       f"batch_size: 2\ngroup_size: 2\nmax_new_tokens: 4\nsteps: 1\n"
                       f"output_dir: {tmp_path / algorithm}\n")
        result = invoke(algorithm, "--config", cfg)
        assert result.exit_code == 0, result.output
        assert (tmp_path / algorithm / "policy" / f"{algorithm}_config.yaml").exists()


def test_rl_command_names_what_is_missing(tmp_path):
    result = invoke("grpo", "--prompts", tmp_path / "p.txt", "--reward", "judge:sentiment")
    assert result.exit_code == 1 and "missing policy: pass --policy or set `policy:`" in result.output
    (tmp_path / "bad.yaml").write_text("policy: x\nprompts: y\nreward: z\nclip_epsilon: 0.1\n")
    result = invoke("ppo", "--config", tmp_path / "bad.yaml")
    assert result.exit_code == 1 and "unknown PPOConfig fields ['clip_epsilon']" in result.output


def test_dpo_command(tmp_path, policy_dir):
    pairs = [PreferencePair(prompt="how do i fix bike", chosen="happy kind nice", rejected="stupid dumb idiot",
                            prompt_id=f"p{i}") for i in range(6)]
    write_records(tmp_path / "pairs.jsonl", pairs)
    result = invoke("dpo", "--policy", policy_dir, "--pairs", tmp_path / "pairs.jsonl", "--epochs", 1,
                    "--output-dir", tmp_path / "dpo")
    assert result.exit_code == 0, result.output
    assert "held-out margin" in result.output and (tmp_path / "dpo" / "policy" / "config.json").exists()


def test_a_model_that_cannot_be_loaded_is_reported_in_one_line(tmp_path):
    (tmp_path / "prompts.txt").write_text("hello\n")
    result = invoke("generate", tmp_path / "prompts.txt", "-o", tmp_path / "c.jsonl", "--model", tmp_path / "nope")
    assert result.exit_code == 1 and "nope: no such model folder" in result.output
    assert "Traceback" not in result.output


def test_evaluate_a_policy_against_itself_finds_no_difference_and_zero_kl(tmp_path, policy_dir):
    (tmp_path / "prompts.txt").write_text("how do i fix bike\nplan day\nbake cake\n")
    out = tmp_path / "eval"
    result = invoke("evaluate", "--policy", policy_dir, "--reference", policy_dir, "--prompts",
                    tmp_path / "prompts.txt", "--judge", "sentiment", "--judge", "judge:profanity", "--samples", 2,
                    "--seeds", 2, "--max-new-tokens", 6, "--no-chat-template", "--output-dir", out)
    assert result.exit_code == 0, result.output
    import yaml

    results = yaml.safe_load((out / "results.yaml").read_text())
    assert set(results["judges"]) == {"relevance", "sentiment", "not_offensive"}  # relevance always
    assert results["judges"]["sentiment"]["difference"] == 0.0  # same model, same seeds, same samples
    assert results["text"]["after"]["kl"] == 0.0
    assert len(read_records(out / "after.jsonl", Completion)) == 3 * 2 * 2
    assert (out / "report.html").exists()
