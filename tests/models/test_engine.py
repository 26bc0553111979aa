"""The rollout engine samples from exactly the distribution `generate` samples from, faster."""

from __future__ import annotations

import pytest
import torch

from conftest import make_generation_config_hostile
from rlhfkit.models import engine as engine_module
from rlhfkit.models.engine import (
    Decoding,
    compiled_kv_cached_sampling,
    generate_sampling,
    has_static_cache,
    kv_cached_sampling,
    sample_completions,
)
from rlhfkit.models.policy import TokenBatch, completion_logits, token_logprobs
from rlhfkit.rollout import completion_mask

EOS, PAD = 3, 0


def peaked(model):
    """Logits ×10 (the final layer norm scaled): a random tiny model is near-uniform, which would hide a
    wrong temperature or position."""
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(10.0)
        model.transformer.ln_f.bias.mul_(10.0)
    return model


def encode(tokenizer, texts):
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


@torch.no_grad()
def teacher_forced_logprobs(model, ids, mask, n, completions, sampling):
    """log softmax(z / τ) (EOS at −∞ before min_new_tokens) of the whole vocabulary at every completion
    position, from one forward pass over prompt + completion."""
    batch = TokenBatch(ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), completions,
                       completion_mask(completions, EOS))
    logits, _ = completion_logits(model, batch)
    vocab = logits.shape[-1]
    every = torch.arange(vocab).expand(*logits.shape[:2], vocab).permute(2, 0, 1)
    return torch.stack([token_logprobs(logits, tokens, sampling)[0] for tokens in every], dim=-1)


def decoding(**kwargs) -> Decoding:
    return Decoding(**{"max_new_tokens": 6, "eos_token_id": EOS, "pad_token_id": PAD} | kwargs)


PROMPTS = ["how do i fix my bike", "help", "what is a good plan for the day"]


def test_greedy_output_is_generates_token_for_token(tiny_causal, tokenizer):
    model = make_generation_config_hostile(peaked(tiny_causal))
    ids, mask = encode(tokenizer, PROMPTS)
    settings = decoding(greedy=True, max_new_tokens=10, min_new_tokens=3)
    ours = kv_cached_sampling(model, ids, mask, 2, settings)
    theirs = generate_sampling(model, ids, mask, 2, settings)
    assert ours.shape == (6, 10)
    assert torch.equal(ours, theirs)


@pytest.mark.slow
@pytest.mark.filterwarnings("error:rollout engine. torch.compile failed:RuntimeWarning")
def test_the_compiled_engine_draws_the_eager_engines_tokens_and_reuses_its_graph_within_a_cache_bucket(
        tiny_causal, tokenizer, monkeypatch):
    """Same seed, same tokens (greedy and sampled, after an in-place weight update, under a bf16 autocast);
    shorter prompts whose cache length rounds up to the same bucket, and updated weights, run the graph
    already compiled."""
    from torch._dynamo.utils import counters

    model = peaked(tiny_causal)
    before = counters["stats"]["unique_graphs"]
    for prompts in (PROMPTS, ["help", "hi", "a plan"]):
        ids, mask = encode(tokenizer, prompts)
        for settings in (decoding(greedy=True, max_new_tokens=10, min_new_tokens=3),
                         decoding(temperature=0.7, max_new_tokens=10)):
            eager = kv_cached_sampling(model, ids, mask, 2, settings, torch.Generator().manual_seed(0))
            compiled = compiled_kv_cached_sampling(model, ids, mask, 2, settings, torch.Generator().manual_seed(0))
            assert torch.equal(compiled, eager)
        if prompts is PROMPTS:
            graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():  # an optimiser's in-place update: the graph reads the new weights, no recompiling
        model.transformer.ln_f.weight.mul_(-1.0)
    settings = decoding(greedy=True, max_new_tokens=10)
    assert torch.equal(compiled_kv_cached_sampling(model, ids, mask, 2, settings),
                       kv_cached_sampling(model, ids, mask, 2, settings))
    assert graphs > before and counters["stats"]["unique_graphs"] == graphs
    dtypes, real_logits = [], engine_module.next_token_logits
    monkeypatch.setattr(engine_module, "next_token_logits", lambda logits, step, settings: dtypes.append(
        logits.dtype) or real_logits(logits, step, settings))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainers' rollouts run under their autocast
        assert torch.equal(compiled_kv_cached_sampling(model, ids, mask, 2, settings),
                           kv_cached_sampling(model, ids, mask, 2, settings))
    assert set(dtypes) == {torch.bfloat16}  # the compiled steps' logits too: they ran under the autocast


@pytest.mark.slow
@pytest.mark.filterwarnings("error:rollout engine. torch.compile failed:RuntimeWarning")
def test_a_frozen_model_decodes_with_its_weights_folded_into_the_graph_and_never_with_stale_ones(
        tiny_causal, tokenizer):
    """Frozen weights (``rlhfkit generate``, evaluation) are constants of the compiled graph: the same tokens as
    the eager engine; after an in-place change of one weight the graph is compiled again (a stale graph would
    decode with the old weights); a copy or a pickle of the model carries no compiled step, and a copy with other
    weights decodes with its own."""
    import copy
    import pickle

    from torch._dynamo.utils import counters

    model = peaked(tiny_causal).requires_grad_(False)
    ids, mask = encode(tokenizer, PROMPTS)
    greedy, sampled = decoding(greedy=True, max_new_tokens=10), decoding(temperature=0.7, max_new_tokens=10)

    def same_as_eager(net) -> None:
        for settings in (greedy, sampled):
            runs = [engine(net, ids, mask, 2, settings, torch.Generator().manual_seed(0))
                    for engine in (compiled_kv_cached_sampling, kv_cached_sampling)]
            assert torch.equal(*runs)

    same_as_eager(model)
    kept = model.__dict__[engine_module.COMPILED_ATTRIBUTE]
    assert kept.frozen is not None and kept.step is not None
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():  # a weight the graph packed: a stale graph would still multiply by the old one
        model.transformer.h[0].attn.c_attn.weight.mul_(-1.0)
    same_as_eager(model)
    assert counters["stats"]["unique_graphs"] > graphs
    twin = copy.deepcopy(model)
    assert vars(twin).get(engine_module.COMPILED_ATTRIBUTE) is None
    assert vars(pickle.loads(pickle.dumps(model))).get(engine_module.COMPILED_ATTRIBUTE) is None
    with torch.no_grad():  # the first weights again, in another model: its own graph, not model's
        twin.transformer.h[0].attn.c_attn.weight.mul_(-1.0)
    same_as_eager(twin)
    model.transformer.ln_f.weight.requires_grad_(True)  # trainable again: the weights are the graph's inputs
    same_as_eager(model)
    assert model.__dict__[engine_module.COMPILED_ATTRIBUTE].frozen is None


@pytest.mark.slow
@pytest.mark.filterwarnings("error:rollout engine. torch.compile failed:RuntimeWarning")
def test_a_forward_hook_added_after_compiling_applies_to_the_compiled_step(tiny_causal, tokenizer):
    """dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``): a graph traced before a hook was
    added (on a module the written-out step calls, or any module of a model run through its own forward) would
    decode without it."""
    model = peaked(tiny_causal).requires_grad_(False)
    ids, mask = encode(tokenizer, PROMPTS)
    settings = decoding(greedy=True, max_new_tokens=8)
    first = compiled_kv_cached_sampling(model, ids, mask, 1, settings)
    assert torch.equal(first, kv_cached_sampling(model, ids, mask, 1, settings))

    def ban(module, args, output):  # a steering hook: the tokens greedy chose are never chosen again
        return output.index_fill(-1, first.unique(), float("-inf"))

    for where in (model.lm_head, model.transformer.h[1].mlp):
        handle = where.register_forward_hook(ban if where is model.lm_head else lambda m, a, o: -3 * o)
        try:
            hooked = compiled_kv_cached_sampling(model, ids, mask, 1, settings)
            assert torch.equal(hooked, kv_cached_sampling(model, ids, mask, 1, settings))
        finally:
            handle.remove()
        assert torch.equal(compiled_kv_cached_sampling(model, ids, mask, 1, settings), first)


@pytest.mark.slow
@pytest.mark.filterwarnings("error:rollout engine. torch.compile failed:RuntimeWarning")
def test_a_frozen_weight_written_through_data_is_read_after_forget_packed_weights(tiny_causal, tokenizer):
    """A write through ``weight.data`` bumps no version (TRL's reference-model sync writes so): as for the kept
    packed weights, ``forget_packed_weights`` is how to say so, and the compiled step must hear it too."""
    from rlhfkit.models.packed import forget_packed_weights

    model = tiny_causal.requires_grad_(False)
    ids, mask = encode(tokenizer, PROMPTS)
    settings = decoding(greedy=True, max_new_tokens=8)
    with torch.no_grad():  # logits ≈ lm_head · b: the token whose embedding row is b wins
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.randn(32, generator=torch.Generator().manual_seed(0)))
    before = compiled_kv_cached_sampling(model, ids, mask, 1, settings)
    favourite = 9 if int(before[0, 1]) != 9 else 10
    model.lm_head.weight.data[favourite] = model.transformer.ln_f.bias * 100  # tied: the embedding's row too
    forget_packed_weights(model)
    after = compiled_kv_cached_sampling(model, ids, mask, 1, settings)
    assert torch.equal(after, kv_cached_sampling(model, ids, mask, 1, settings, packed=False))
    assert bool((after == favourite).all())


@pytest.mark.slow
def test_an_error_of_the_model_in_a_compiled_step_is_raised_and_compiling_goes_on(tiny_causal):
    """Decoding past GPT-2's positions is the caller's error, not the compiler's: it is raised as the eager step
    raises it, with no 'torch.compile failed' warning, and the model's later calls still run compiled."""
    import warnings

    settings = decoding(greedy=True, max_new_tokens=20, eos_token_id=None)
    model = tiny_causal.requires_grad_(False)  # 128 positions
    ids = torch.randint(4, 40, (2, 120), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(IndexError):
            compiled_kv_cached_sampling(model, ids, torch.ones_like(ids), 1, settings)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert model.__dict__[engine_module.COMPILED_ATTRIBUTE].step is not None
    ids = ids[:, :20]
    assert torch.equal(compiled_kv_cached_sampling(model, ids, torch.ones_like(ids), 1, settings),
                       kv_cached_sampling(model, ids, torch.ones_like(ids), 1, settings))
    assert model.__dict__[engine_module.COMPILED_ATTRIBUTE].step is not None


def test_where_compilation_fails_the_compiled_engine_warns_once_and_decodes_eagerly(tiny_causal, tokenizer,
                                                                                    monkeypatch):
    def no_compiler(function, **options):
        def fails(*args, **kwargs):
            raise RuntimeError("InductorError: CppCompileError: no C++ compiler found\n(details)")
        return fails

    monkeypatch.setattr(torch, "compile", no_compiler)
    ids, mask = encode(tokenizer, PROMPTS)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .RuntimeError: InductorError") as caught:
        compiled = compiled_kv_cached_sampling(tiny_causal, ids, mask, 2, decoding(),
                                               torch.Generator().manual_seed(0))
    assert len([w for w in caught if "torch.compile" in str(w.message)]) == 1
    assert torch.equal(compiled, kv_cached_sampling(tiny_causal, ids, mask, 2, decoding(),
                                                    torch.Generator().manual_seed(0)))


def test_a_left_padded_prompt_decodes_as_it_does_alone(tiny_causal, tokenizer):
    model = peaked(tiny_causal)
    settings = decoding(greedy=True, max_new_tokens=12)
    ids, mask = encode(tokenizer, PROMPTS)
    together = kv_cached_sampling(model, ids, mask, 1, settings)
    for row, prompt in enumerate(PROMPTS):
        alone = kv_cached_sampling(model, *encode(tokenizer, [prompt]), 1, settings)
        assert torch.equal(together[row, :alone.shape[1]], alone[0])


def frozen_then_compiled(model, *args):
    """``compiled_kv_cached_sampling`` on ``model`` frozen: the weights folded into the graph."""
    return compiled_kv_cached_sampling(model.requires_grad_(False), *args)


@pytest.mark.parametrize("engine", [
    kv_cached_sampling, pytest.param(compiled_kv_cached_sampling, marks=pytest.mark.slow, id="compiled"),
    pytest.param(frozen_then_compiled, marks=pytest.mark.slow, id="compiled_frozen")])
def test_the_engine_sees_the_logprobs_a_teacher_forced_pass_computes(tiny_causal, tokenizer, monkeypatch, engine):
    """Temperature, min_new_tokens, padding and positions: every distribution the engine (eager, compiled, or
    compiled with the weights folded in) draws from equals softmax(z / τ) of the forward pass the algorithms
    compute log-probs with."""
    from rlhfkit.models.policy import SamplingDistribution

    model = peaked(tiny_causal)
    seen = []
    real_draw = engine_module.draw
    monkeypatch.setattr(engine_module, "draw", lambda z, greedy, generator: seen.append(z.log_softmax(-1))
                        or real_draw(z, greedy, generator))
    ids, mask = encode(tokenizer, PROMPTS)
    settings = decoding(temperature=0.7, min_new_tokens=4)
    completions = engine(model, ids, mask, 3, settings, torch.Generator().manual_seed(0))
    engine_logprobs = torch.stack(seen, dim=1)
    expected = teacher_forced_logprobs(model, ids, mask, 3, completions, SamplingDistribution(0.7, 4, EOS))
    live = completion_mask(completions, EOS).bool()
    torch.testing.assert_close(engine_logprobs[live], expected[live], atol=1e-4, rtol=1e-4)
    assert (completions[:, :4] != EOS).all()


def goodness_of_fit(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test that ``tokens`` [N] were drawn with probabilities ``probs`` [V]
    (tokens expected fewer than 5 times pooled into one cell)."""
    from scipy.stats import chisquare

    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    rare = expected < 5
    if expected[rare].sum() > 0:
        observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    else:
        observed, expected = observed[~rare], expected[~rare]
    return float(chisquare(observed.numpy(), (expected * observed.sum() / expected.sum()).numpy()).pvalue)


def same_distribution(first: torch.Tensor, second: torch.Tensor) -> float:
    """p-value of the chi-square test of homogeneity that two samples of token ids come from one distribution."""
    from scipy.stats import chi2_contingency

    counts = torch.stack([torch.bincount(first, minlength=int(max(first.max(), second.max())) + 1),
                          torch.bincount(second, minlength=int(max(first.max(), second.max())) + 1)])
    return float(chi2_contingency(counts[:, counts.sum(0) > 0].numpy()).pvalue)


@pytest.mark.parametrize("temperature", [0.6, 1.3])
def test_token_frequencies_match_softmax_over_temperature_and_generates(tiny_causal, tokenizer, temperature):
    """At each position t the engine's tokens over 2000 samples per prompt pass a chi-square test against
    E[softmax(z_t / τ)] (teacher-forced passes over the samples) and against `generate`'s samples; the same
    test rejects the distribution with the temperature ignored (τ = 1)."""
    from rlhfkit.models.policy import SamplingDistribution

    model = peaked(tiny_causal)
    ids, mask = encode(tokenizer, ["help", "how do i fix my bike"])
    settings = decoding(max_new_tokens=3, min_new_tokens=2, temperature=temperature)
    n = 2000
    ours = kv_cached_sampling(model, ids, mask, n, settings, torch.Generator().manual_seed(1))
    theirs = generate_sampling(model, ids, mask, n, settings, torch.Generator().manual_seed(2))
    for prompt in range(2):
        rows, one = slice(prompt * n, (prompt + 1) * n), slice(prompt, prompt + 1)
        right, wrong = (teacher_forced_logprobs(model, ids[one], mask[one], n, ours[rows],
                                                SamplingDistribution(tau, 2, EOS)).exp().mean(0)
                        for tau in (temperature, 1.0))
        for t in range(3):
            assert goodness_of_fit(ours[rows, t], right[t]) > 1e-3
            assert same_distribution(ours[rows, t], theirs[rows, t]) > 1e-3
        assert min(goodness_of_fit(ours[rows, t], wrong[t]) for t in range(3)) < 1e-6


def eos_favoured(model, boost: float):
    """EOS's logit raised by ``boost`` at every position (a hook on the LM head)."""
    def hook(module, inputs, output):
        output[..., EOS] += boost
        return output
    model.lm_head.register_forward_hook(hook)
    return model


def test_min_new_tokens_is_honoured_and_the_loop_stops_when_every_sequence_has_ended(tiny_causal, tokenizer):
    model = eos_favoured(tiny_causal, 100.0)
    ids, mask = encode(tokenizer, PROMPTS)
    completions = kv_cached_sampling(model, ids, mask, 4, decoding(max_new_tokens=20, min_new_tokens=3))
    assert completions.shape == (12, 4)
    assert (completions[:, :3] != EOS).all() and (completions[:, 3] == EOS).all()


def test_a_sequence_that_ended_gets_padding_and_others_go_on(tiny_causal, tokenizer):
    model = eos_favoured(tiny_causal, 3.0)  # EOS at p ≈ 0.25 each step: sequences end at different steps
    ids, mask = encode(tokenizer, PROMPTS)
    completions = kv_cached_sampling(model, ids, mask, 8, decoding(max_new_tokens=12),
                                     torch.Generator().manual_seed(0))
    ended_at = (completions == EOS).float().argmax(1)
    assert ended_at.unique().numel() > 1
    for row, end in enumerate(ended_at.tolist()):
        assert (completions[row, end + 1:] == PAD).all()
    assert completions.shape[1] == int(ended_at.max()) + 1  # no step after the last sequence ended


def test_right_padded_prompts_are_refused(tiny_causal, tokenizer):
    tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="left-padded"):
        kv_cached_sampling(tiny_causal, *encode(tokenizer, PROMPTS), 1, decoding())


def test_seq2seq_models_fall_back_to_generate(tiny_seq2seq, tokenizer):
    assert not has_static_cache(tiny_seq2seq)
    ids, mask = encode(tokenizer, PROMPTS)
    settings = decoding(greedy=True, max_new_tokens=5)
    assert torch.equal(sample_completions(tiny_seq2seq, ids, mask, 2, settings),
                       generate_sampling(tiny_seq2seq, ids, mask, 2, settings))


def test_a_generator_makes_samples_reproducible_on_both_paths(tiny_causal, tiny_seq2seq, tokenizer):
    ids, mask = encode(tokenizer, PROMPTS)
    for model in (tiny_causal, tiny_seq2seq):
        first, second = (sample_completions(model, ids, mask, 2, decoding(), torch.Generator().manual_seed(5))
                         for _ in range(2))
        assert torch.equal(first, second)


def test_a_prompt_tuned_peft_model_samples_with_its_virtual_tokens(tiny_causal, tokenizer):
    """peft's prompt tuning prepends learned tokens in its own forward: the engine leaves such models to generate."""
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny_causal, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    assert not has_static_cache(model)
    encoded = tokenizer(["how do i fix my bike", "thanks"], return_tensors="pt", padding=True)
    settings = Decoding(6, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=True)
    assert torch.equal(sample_completions(model, encoded["input_ids"], encoded["attention_mask"], 1, settings),
                       generate_sampling(model, encoded["input_ids"], encoded["attention_mask"], 1, settings))
