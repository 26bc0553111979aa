import pytest

from conftest import build_tiny_causal, make_generation_config_hostile, make_prompts
from rlhfkit.data.io import read_records
from rlhfkit.data.records import Completion, Prompt, SamplingParams
from rlhfkit.generate import format_prompt, generate_completions
from rlhfkit.models.policy import prepare_tokenizer

SAMPLING = SamplingParams(max_new_tokens=6, seed=3)


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_n_completions_per_prompt_from_causal_and_seq2seq(family, tiny_causal, tiny_seq2seq, tokenizer):
    model = tiny_causal if family == "causal" else tiny_seq2seq
    prepare_tokenizer(tokenizer, model)
    prompts = make_prompts(3)
    completions = generate_completions(model, tokenizer, prompts, n=4, sampling=SAMPLING, batch_size=2,
                                       progress=False)
    assert len(completions) == 12
    assert [c.id for c in completions[:4]] == ["p0-0", "p0-1", "p0-2", "p0-3"]
    assert {c.prompt_id for c in completions} == {"p0", "p1", "p2"}
    assert all(c.text and c.sampling == SAMPLING for c in completions)
    # samples differ (the tiny random model has a flat distribution over 50 words)
    assert len({c.text for c in completions if c.prompt_id == "p0"}) > 1


def test_same_seed_same_completions(tiny_causal, tokenizer):
    prepare_tokenizer(tokenizer, tiny_causal)
    runs = [[c.text for c in generate_completions(tiny_causal, tokenizer, make_prompts(2), n=2, sampling=SAMPLING,
                                                  progress=False)] for _ in range(2)]
    assert runs[0] == runs[1]


def test_causal_completion_excludes_the_prompt(tiny_causal, tokenizer):
    prepare_tokenizer(tokenizer, tiny_causal)
    [completion] = generate_completions(tiny_causal, tokenizer, make_prompts(1), n=1,
                                        sampling=SamplingParams(max_new_tokens=3), progress=False)
    assert len(completion.text.split()) <= 3


def test_resume_skips_done_prompts_and_redoes_a_torn_one(tmp_path, tiny_causal, tokenizer):
    prepare_tokenizer(tokenizer, tiny_causal)
    out = tmp_path / "completions.jsonl"
    first = generate_completions(tiny_causal, tokenizer, make_prompts(2), n=3, sampling=SAMPLING, output=out,
                                 progress=False)
    assert len(first) == 6
    assert generate_completions(tiny_causal, tokenizer, make_prompts(2), n=3, sampling=SAMPLING, output=out,
                                progress=False) == []
    # a crash mid-append: the last line of p1 torn in half, so p1 has 2 of its 3 completions
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:20])
    redone = generate_completions(tiny_causal, tokenizer, make_prompts(3), n=3, sampling=SAMPLING, output=out,
                                  progress=False)
    assert sorted({c.prompt_id for c in redone}) == ["p1", "p2"]
    stored = read_records(out, Completion)
    assert len(stored) == 9
    assert sorted(c.id for c in stored) == [f"p{i}-{j}" for i in range(3) for j in range(3)]
    assert [c.text for c in stored if c.prompt_id == "p0"] == [c.text for c in first if c.prompt_id == "p0"]


def test_chat_template_wraps_plain_prompt_as_user_turn(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}<bos> {{ m['role'] }} {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant{% endif %}")
    assert format_prompt("hi there", tokenizer, True) == "<bos> user hi there assistant"
    assert format_prompt("hi there", tokenizer, False) == "hi there"


@pytest.mark.parametrize("do_sample", [True, False], ids=["sampling", "greedy"])
def test_generation_ignores_a_hostile_generation_config_of_the_model(do_sample, tokenizer):
    """Only rlhfkit's sampling settings count: a checkpoint's no_repeat_ngram_size, suppress_tokens,
    bad_words_ids, min_new_tokens, num_beams, top-k... change nothing."""
    sampling = SamplingParams(max_new_tokens=8, seed=3, do_sample=do_sample)
    runs = []
    for model in (build_tiny_causal(), make_generation_config_hostile(build_tiny_causal())):
        prepare_tokenizer(tokenizer, model)
        runs.append([c.text for c in generate_completions(model, tokenizer, make_prompts(3), n=1, sampling=sampling,
                                                          progress=False)])
    assert runs[0] == runs[1]


def test_a_prompt_longer_than_the_model_positions_is_refused_by_id(tiny_causal, tokenizer):
    prepare_tokenizer(tokenizer, tiny_causal)
    prompts = [*make_prompts(1), Prompt(id="long-one", text=" ".join(["cake"] * 200))]
    with pytest.raises(ValueError, match=r"prompt 'long-one' has 200 tokens; the model's 128 positions leave room "
                                         r"for 122 with max_new_tokens 6"):
        generate_completions(tiny_causal, tokenizer, prompts, n=1, sampling=SAMPLING, progress=False)


def test_plain_strings_instead_of_prompt_records_are_refused_by_position(tiny_causal, tokenizer):
    with pytest.raises(TypeError, match=r"prompts\[1\] is a str; generate_completions takes Prompt records"):
        generate_completions(tiny_causal, tokenizer, [Prompt(id="a", text="help you"), "fix bike"], n=1)


def test_every_weight_is_packed_once_for_all_batches_and_the_model_stays_trainable(tiny_causal, tokenizer,
                                                                                   monkeypatch):
    import torch

    from rlhfkit.models.packed import packable_layers

    packings = []
    real = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda *args: packings.append(1) or real(*args))
    prepare_tokenizer(tokenizer, tiny_causal)
    generate_completions(tiny_causal, tokenizer, make_prompts(3), n=2, sampling=SAMPLING, batch_size=1,
                         progress=False)
    assert len(packings) == len(packable_layers(tiny_causal))  # 3 batches, one packing
    assert all(p.requires_grad for p in tiny_causal.parameters())


@pytest.mark.slow
@pytest.mark.filterwarnings("error:rollout engine. torch.compile failed:RuntimeWarning")
def test_a_compiled_run_writes_the_same_completions_with_the_weights_folded_in(tiny_causal, tokenizer,
                                                                              monkeypatch):
    """``compiled=True`` (``rlhfkit generate --compile``): the decode step compiled with the frozen weights as
    constants of its graph, the same completions as the default engine, and the model trainable afterwards; the
    last batch, smaller than the others, decodes eagerly (its shape would cost a compile of its own)."""
    import rlhfkit.generate as generate_module
    from rlhfkit.models.engine import COMPILED_ATTRIBUTE

    flags, real = [], generate_module.sample_completions
    monkeypatch.setattr(generate_module, "sample_completions",
                        lambda *args, compiled, **kwargs: flags.append(compiled) or real(*args, compiled=compiled,
                                                                                          **kwargs))
    prepare_tokenizer(tokenizer, tiny_causal)
    runs = [[c.text for c in generate_completions(tiny_causal, tokenizer, make_prompts(3), n=2, sampling=SAMPLING,
                                                  batch_size=2, progress=False, compiled=compiled)]
            for compiled in (False, True)]
    assert runs[0] == runs[1] and flags == [False, False, True, False]
    assert tiny_causal.__dict__[COMPILED_ATTRIBUTE].frozen is not None
    assert all(p.requires_grad for p in tiny_causal.parameters())
