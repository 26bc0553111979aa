import random

import pytest

from rlhfkit.cai.constitution import Constitution, load_constitution
from rlhfkit.data.io import DataError

RULES = Constitution.model_validate({
    "name": "t",
    "principles": [{"name": "kind", "critique": "Is it rude?", "revision": "Make it kind.", "choose": "Kinder?"},
                   {"name": "honest", "critique": "Is it false?", "revision": "Make it true."}],
})


def test_default_constitution_loads_with_principles_and_examples():
    rules = load_constitution()
    assert len(rules.principles) >= 4 and rules.examples
    assert all(p.critique and p.revision and p.choose for p in rules.principles)


def test_exact_critique_and_revision_strings():
    kind = RULES.principles[0]
    assert RULES.critique_prompt("Hi?", "Go away.", kind) == (
        "Human: Hi?\n\nAssistant: Go away.\n\nCritiqueRequest: Is it rude?\n\nCritique:")
    assert RULES.revision_prompt("Hi?", "Go away.", kind, "It is rude.") == (
        "Human: Hi?\n\nAssistant: Go away.\n\nCritiqueRequest: Is it rude?\n\nCritique: It is rude.\n\n"
        "RevisionRequest: Make it kind.\n\nRevision:")
    assert RULES.comparison_prompt("Hi?", "Hello!", "Go away.", kind) == (
        "Consider the following conversation between a human and an assistant:\n\nHuman: Hi?\n\nKinder?\n\n"
        "Options:\n(A) Hello!\n(B) Go away.")


def test_few_shot_examples_come_first_and_templates_are_configurable():
    rules = Constitution.model_validate({
        "principles": [{"name": "kind", "critique": "C?", "revision": "R."}],
        "examples": [{"prompt": "P", "response": "Bad.", "critique": "Rude.", "revision": "Good."}],
        "templates": {"conversation": "USER: {prompt}\nBOT: {response}", "example_separator": "\n###\n"},
    })
    text = rules.critique_prompt("Q", "A", rules.principles[0])
    assert text == ("USER: P\nBOT: Bad.\n\nCritiqueRequest: C?\n\nCritique: Rude.\n\nRevisionRequest: R.\n\n"
                    "Revision: Good.\n###\nUSER: Q\nBOT: A\n\nCritiqueRequest: C?\n\nCritique:")


def test_fresh_principles_are_drawn_while_any_are_left():
    rng = random.Random(0)
    assert RULES.draw(rng, {"kind"}).name == "honest"
    assert RULES.draw(rng, {"kind", "honest"}).name in {"kind", "honest"}


def test_generated_text_is_cut_where_the_model_continues_the_pattern():
    assert RULES.cut(" It is rude.\n\nRevisionRequest: more") == "It is rude."


def test_bad_constitution_names_the_file_and_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("principles:\n  - name: kind\n    critique: Is it rude?\n")
    with pytest.raises(DataError, match=r"c\.yaml: field 'principles\.0\.revision'"):
        load_constitution(path)
    path.write_text("principles: [{name: a, critique: c, revision: r}]\ntemplates: {critique: 'no fields'}\n")
    with pytest.raises(DataError, match="lacks"):
        load_constitution(path)
    path.write_text("principles: [\n")
    with pytest.raises(DataError, match="not valid YAML"):
        load_constitution(path)
