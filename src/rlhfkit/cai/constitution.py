"""A constitution is data: written principles, few-shot examples and the prompt templates that turn
them into model inputs (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

YAML layout (see ``resources/constitution.yaml``, the default)::

    name: my-constitution
    principles:
      - name: harmless
        critique: Identify specific ways in which the assistant's last response is harmful ...
        revision: Please rewrite the assistant's response to remove any harmful ... content.
        choose: Which of these assistant responses is less harmful? ...       # for RLAIF
    examples:                       # optional few-shot critique → revision examples
      - {prompt: ..., response: ..., critique: ..., revision: ...}
    templates:                      # optional; any of the Templates fields below
      critique: "..."

Templates are Python format strings; the exact strings they produce are what ``--dry-run`` shows.
"""

from __future__ import annotations

import os
import random
from importlib.resources import files
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhfkit.data.io import DataError, validation_error


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    critique: str = Field(min_length=1)  # the critique request
    revision: str = Field(min_length=1)  # the revision request
    choose: str = "Which of these assistant responses is better?"  # the comparison question for RLAIF


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: str
    response: str
    critique: str
    revision: str
    principle: str | None = None  # the principle's name; default: the first principle


class Templates(BaseModel):
    """How prompts, critiques, revisions and comparisons are laid out for the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    conversation: str = "Human: {prompt}\n\nAssistant: {response}"
    critique: str = "{conversation}\n\nCritiqueRequest: {critique_request}\n\nCritique:"
    revision: str = ("{conversation}\n\nCritiqueRequest: {critique_request}\n\nCritique: {critique}\n\n"
                     "RevisionRequest: {revision_request}\n\nRevision:")
    example_separator: str = "\n\n---\n\n"
    # A comparison is the question (a user turn for chat models) followed by the start of the answer.
    comparison: str = ("Consider the following conversation between a human and an assistant:\n\n"
                       "Human: {prompt}\n\n{question}\n\nOptions:\n(A) {first}\n(B) {second}")
    answer: str = "The answer is: ("
    thought: str = "Let's think step by step:"  # chain of thought: generated before the answer
    after_thought: str = "\n\nTherefore, the answer is: ("
    options: tuple[str, str] = ("A", "B")  # the answer tokens whose probabilities give the label
    stop: tuple[str, ...] = ("\n\nCritiqueRequest:", "\n\nRevisionRequest:", "\n\nHuman:", "\n\n---")

    @model_validator(mode="after")
    def _fields_present(self) -> Templates:
        needed = {"conversation": ["{prompt}", "{response}"], "critique": ["{conversation}", "{critique_request}"],
                  "revision": ["{conversation}", "{critique}", "{revision_request}"],
                  "comparison": ["{prompt}", "{question}", "{first}", "{second}"]}
        for name, fields in needed.items():
            missing = [f for f in fields if f not in getattr(self, name)]
            if missing:
                raise ValueError(f"template {name!r} lacks {', '.join(missing)}")
        return self


class Constitution(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "constitution"
    principles: list[Principle] = Field(min_length=1)
    examples: list[Example] = Field(default_factory=list)
    templates: Templates = Field(default_factory=Templates)

    @model_validator(mode="after")
    def _examples_name_principles(self) -> Constitution:
        names = {p.name for p in self.principles}
        for i, example in enumerate(self.examples):
            if example.principle is not None and example.principle not in names:
                raise ValueError(f"examples.{i}.principle {example.principle!r} is not one of {sorted(names)}")
        return self

    def draw(self, rng: random.Random, avoid: set[str] = frozenset()) -> Principle:
        """A principle at random, preferring ones not in ``avoid`` (fresh principles for each round)."""
        fresh = [p for p in self.principles if p.name not in avoid] or self.principles
        return rng.choice(fresh)

    def principle(self, name: str | None) -> Principle:
        return next((p for p in self.principles if p.name == name), self.principles[0])

    # ------------------------------------------------------------ the strings that go into the model
    def conversation(self, prompt: str, response: str) -> str:
        return self.templates.conversation.format(prompt=prompt, response=response)

    def few_shot(self) -> str:
        """The examples as complete critique → revision texts, each followed by the separator."""
        shots = []
        for ex in self.examples:
            principle = self.principle(ex.principle)
            shots.append(self.templates.revision.format(
                conversation=self.conversation(ex.prompt, ex.response), critique_request=principle.critique,
                critique=ex.critique, revision_request=principle.revision) + " " + ex.revision)
        return "".join(shot + self.templates.example_separator for shot in shots)

    def critique_prompt(self, prompt: str, response: str, principle: Principle) -> str:
        return self.few_shot() + self.templates.critique.format(
            conversation=self.conversation(prompt, response), critique_request=principle.critique)

    def revision_prompt(self, prompt: str, response: str, principle: Principle, critique: str) -> str:
        return self.few_shot() + self.templates.revision.format(
            conversation=self.conversation(prompt, response), critique_request=principle.critique,
            critique=critique, revision_request=principle.revision)

    def comparison_prompt(self, prompt: str, first: str, second: str, principle: Principle) -> str:
        return self.templates.comparison.format(prompt=prompt, question=principle.choose, first=first, second=second)

    def cut(self, generated: str) -> str:
        """A generated critique or revision up to the first stop string (the model continuing the pattern)."""
        for stop in self.templates.stop:
            generated = generated.split(stop, 1)[0]
        return generated.strip()


def default_constitution_path() -> Path:
    return Path(str(files("rlhfkit") / "resources" / "constitution.yaml"))


def load_constitution(path: str | os.PathLike | None = None) -> Constitution:
    """Read a constitution YAML (default: rlhfkit's own); errors name the file and the field."""
    path = Path(path) if path is not None else default_constitution_path()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(f"not valid YAML: {getattr(exc, 'problem', exc)}", path,
                        mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise DataError("a constitution is a mapping with a 'principles' list", path)
    try:
        return Constitution.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, path, None) from None
