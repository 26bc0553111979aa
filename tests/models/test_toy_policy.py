import os
import shutil
from collections import Counter

import pytest

from rlhfkit.models.toy_policy import ToyPolicyConfig, corpus_examples, load_toy_policy, toy_corpus, toy_prompts


def test_corpus_mixes_kind_rude_and_empty_replies_as_configured():
    corpus = toy_corpus()
    examples = corpus_examples(corpus, 4000, seed=0)
    for kind, openers in corpus["openers"].items():
        share = sum(reply.startswith(tuple(openers)) for _, reply in examples) / len(examples)
        assert share == pytest.approx(corpus["mix"][kind], abs=0.03)
    assert sum(reply in corpus["empty"] for _, reply in examples) / len(examples) == pytest.approx(
        corpus["mix"]["empty"], abs=0.03)
    assert all("{topic}" not in q + a for q, a in examples)


def test_a_mix_of_its_own_replaces_the_corpus_s_and_only_it_changes_the_cache_key(tmp_path):
    corpus = toy_corpus()
    examples = corpus_examples(corpus, 2000, seed=0, mix={"kind": 0.85, "empty": 0.15})
    rude = sum(reply.startswith(tuple(corpus["openers"]["rude"])) for _, reply in examples)
    assert rude == 0 and sum(reply in corpus["empty"] for _, reply in examples) / 2000 == pytest.approx(0.15, abs=0.03)
    small = {"examples": 40, "epochs": 1, "vocab_size": 300, "n_embd": 16, "n_layer": 1, "n_head": 2}
    folders = {load_toy_policy(tmp_path, ToyPolicyConfig(**small, mix=mix), progress=False)[2].name
               for mix in (None, {"kind": 1.0})}
    assert len(folders) == 2


@pytest.mark.parametrize("mix", [{}, {"polite": 1.0}, {"kind": -1.0, "empty": 2.0}, {"kind": 0.0}, {"kind": "1"},
                                 {"kind": 1.0, "rude": float("inf")}, {"kind": True}, {"kind": 1e308, "empty": 1e308},
                                 {"kind": float("nan")}, ["kind"], "kind"])
def test_a_mix_that_cannot_be_drawn_is_refused_in_one_line(mix):
    with pytest.raises(ValueError, match=r"^mix: "):
        ToyPolicyConfig(mix=mix)


def test_held_out_prompts_are_about_other_topics():
    corpus = toy_corpus()
    train, test = toy_prompts(corpus["topics"][:-12], corpus), toy_prompts(corpus["topics"][-12:], corpus, seed=1)
    assert len(test) == 24 and len({p.id for p in train + test}) == len(train) + len(test)
    assert not any(topic in p.text for topic in corpus["topics"][-12:] for p in train)
    assert Counter(p.id.rsplit("-", 1)[0] for p in test).most_common(1)[0][1] == 2  # two requests per topic


def test_toy_policy_is_trained_once_then_loaded_from_the_cache(tmp_path):
    config = ToyPolicyConfig(examples=200, epochs=1, vocab_size=400, n_embd=32)
    _, tokenizer, folder = load_toy_policy(tmp_path, config, progress=False)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    _, _, same = load_toy_policy(tmp_path, config, progress=False)
    assert same == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert tokenizer.padding_side == "left" and tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Any tips for baking bread?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "user: Any tips for baking bread?\nassistant:"
    assert tokenizer.decode(tokenizer("Great question! For baking bread")["input_ids"]) == \
        "Great question! For baking bread"


def test_a_policy_that_drops_the_insults_keeps_the_diversity_of_the_advice():
    """The demo's bar asks distinct-2 after ≥ 0.9 × before. In this corpus a rude reply insults and then
    advises, so the ideal aligned policy (the initial one with kind openers only) keeps the advice's
    variety: at the demo's 288 evaluation answers it stays above that bar (before the corpus was built so,
    rude replies were their own stock phrases and the ideal policy scored 0.65 ×)."""
    import random

    from rlhfkit.eval.metrics import distinct_n

    corpus = toy_corpus()

    def answers(weights: dict[str, float], seed: int) -> list[str]:
        rng, texts = random.Random(seed), []
        for topic in corpus["topics"][-12:]:
            for _ in range(24):
                kind = rng.choices(list(weights), list(weights.values()))[0]
                advice = rng.choice(corpus["advice"]).format(topic=topic)
                texts.append(rng.choice(corpus["empty"]) if kind == "empty" else
                             f"{rng.choice(corpus['openers'][kind])} {advice}")
        return texts

    ratios = [distinct_n(answers({"kind": 1.0}, seed), 2) / distinct_n(answers(corpus["mix"], seed), 2)
              for seed in range(5)]
    assert sum(ratios) / len(ratios) > 0.93


def test_two_processes_training_the_toy_policy_at_once_both_load_the_one_cached(tmp_path, monkeypatch):
    """Two demos started together on a fresh machine: the second to finish crashed renaming its folder onto the
    first's ("Directory not empty"), after both had written into one shared .partial folder."""
    import rlhfkit.models.toy_policy as toy

    config = ToyPolicyConfig(examples=200, epochs=1, vocab_size=400, n_embd=32)
    _, _, folder = load_toy_policy(tmp_path / "first", config, progress=False)
    trained = toy.train_toy_policy

    def the_other_finishes_meanwhile(*args, **kwargs):
        result = trained(*args, **kwargs)
        shutil.copytree(folder, tmp_path / "second" / folder.name)
        return result

    monkeypatch.setattr(toy, "train_toy_policy", the_other_finishes_meanwhile)
    model, _, same = load_toy_policy(tmp_path / "second", config, progress=False)
    assert same.name == folder.name and os.listdir(tmp_path / "second") == [folder.name]
    assert model.config.n_embd == 32


def test_the_toy_policy_trains_the_same_whatever_the_callers_threads_and_leaves_its_generators_alone():
    """A cache trained by a run with OMP_NUM_THREADS=1 held other weights (0.04 apart) than one trained with the
    default threads; and the run that trained it drew other adapters than its reruns, from the generator state
    the training left."""
    import torch

    from rlhfkit.models.toy_policy import train_toy_policy

    config = ToyPolicyConfig(examples=200, epochs=1, vocab_size=400, n_embd=32)
    threads, weights = torch.get_num_threads(), []
    try:
        for caller in (1, 3):
            torch.set_num_threads(caller)
            torch.manual_seed(7)
            state = torch.random.get_rng_state()
            model, _ = train_toy_policy(config, progress=False)
            assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == caller
            weights.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_half_written_toy_policy_folder_in_the_cache_is_trained_again_not_loaded_forever(tmp_path):
    """A cached folder without its config.json (deleted by hand to retrain, a copy cut short) was taken for a whole
    one put there by another process: every run trained the model again, then crashed loading that folder."""
    config = ToyPolicyConfig(examples=200, epochs=1, vocab_size=400, n_embd=32)
    _, _, folder = load_toy_policy(tmp_path / "first", config, progress=False)
    half = shutil.copytree(folder, tmp_path / "second" / folder.name)
    (half / "config.json").unlink()
    model, tokenizer, same = load_toy_policy(tmp_path / "second", config, progress=False)
    assert same == half and (half / "config.json").exists() and os.listdir(tmp_path / "second") == [folder.name]
    assert model.config.n_embd == 32 and tokenizer.chat_template
