"""The records that flow between pipeline stages.

prompts.jsonl → completions.jsonl → rankings.jsonl → pairs.jsonl. Every line of every file is one of
these records plus a ``schema`` field (``"rlhfkit.<kind>/<version>"``) so that a file given to the
wrong stage, or written by a future version, is refused with a clear message instead of misread.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Record(BaseModel):
    """Base of every record: strict about unknown fields and non-finite numbers (a NaN score or label
    would be written as the non-JSON literal ``NaN`` and poison every mean), knows its schema name."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kind: ClassVar[str]
    version: ClassVar[int] = 1
    # The field that must be unique within one file (None: no uniqueness rule).
    id_field: ClassVar[str | None] = "id"

    @classmethod
    def schema_name(cls) -> str:
        return f"rlhfkit.{cls.kind}/{cls.version}"


class Message(BaseModel):
    """One chat turn, as in the `messages` lists of chat templates and TRL's conversational format."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant", "tool"]
    content: str


# Plain text, or a conversation (list of chat turns) as in TRL's conversational format.
Text = str | list[Message]


class Prompt(Record):
    kind: ClassVar[str] = "prompt"
    id: str = Field(min_length=1)
    text: Text
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: Text) -> Text:
        blank = not text.strip() if isinstance(text, str) else not any(m.content.strip() for m in text)
        if blank:
            raise ValueError("the prompt is empty or blank; remove the line or give it a text")
        return text


class SamplingParams(BaseModel):
    """How a completion was sampled; stored with it so that a file says how it was made."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    do_sample: bool = True
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # 0 = no top-k truncation
    max_new_tokens: int = Field(default=64, ge=1)
    seed: int = 0


class Completion(Record):
    kind: ClassVar[str] = "completion"
    id: str = Field(min_length=1)
    prompt_id: str = Field(min_length=1)
    prompt: Text
    text: str
    index: int = Field(ge=0, description="0..N-1 among the N completions of this prompt")
    model: str = ""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    # True: stopped by max_new_tokens before EOS; the text is the start of an answer (trained without EOS).
    truncated: bool = False
    # Scores added later by `rlhfkit reward score` (name -> value).
    scores: dict[str, float] = Field(default_factory=dict)


class Ranking(Record):
    """One labeler's ranking of one prompt's N completions.

    ``groups`` lists completion ids best first; a group of more than one id is a tie. The groups must
    be a partition of the prompt's completions (checked by :func:`check_partition` against the
    completions file). ``flagged`` marks completions the labeler found nonsensical or unusable; they
    are still ranked, so that a ranking always covers every completion.
    """

    kind: ClassVar[str] = "ranking"
    id_field: ClassVar[str | None] = None  # uniqueness is (prompt_id, labeler_id), checked in pairs.py
    prompt_id: str = Field(min_length=1)
    labeler_id: str = Field(min_length=1)
    criterion: str = "helpfulness"
    groups: list[list[str]] = Field(min_length=1)
    flagged: list[str] = Field(default_factory=list)

    @field_validator("groups")
    @classmethod
    def _groups_disjoint_and_nonempty(cls, groups: list[list[str]]) -> list[list[str]]:
        seen: set[str] = set()
        for position, group in enumerate(groups):
            if not group:
                raise ValueError(f"group {position} is empty; every group must hold at least one completion id")
            for cid in group:
                if cid in seen:
                    raise ValueError(f"completion {cid!r} appears more than once; groups must not overlap")
                seen.add(cid)
        return groups

    @model_validator(mode="after")
    def _flagged_are_ranked(self) -> Ranking:
        unknown = sorted(set(self.flagged) - set(self.completion_ids))
        if unknown:
            raise ValueError(f"flagged ids {unknown} are not in the ranking's groups")
        return self

    @property
    def completion_ids(self) -> list[str]:
        return [cid for group in self.groups for cid in group]

    def check_partition(self, expected_ids: set[str]) -> None:
        """Raise ValueError unless the groups cover exactly ``expected_ids``."""
        ranked = set(self.completion_ids)
        missing, extra = sorted(expected_ids - ranked), sorted(ranked - expected_ids)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unknown {extra}")
            raise ValueError(
                f"ranking of prompt {self.prompt_id!r} by {self.labeler_id!r} is not a partition of the "
                f"prompt's completions: {'; '.join(parts)}"
            )


class PreferencePair(Record):
    """A comparison: ``chosen`` was preferred to ``rejected`` as an answer to ``prompt``."""

    kind: ClassVar[str] = "pair"
    id_field: ClassVar[str | None] = None
    prompt: Text
    chosen: Text
    rejected: Text
    prompt_id: str | None = None
    chosen_id: str | None = None
    rejected_id: str | None = None
    # Where the comparison came from: source file or format, labelers, consensus method, criterion.
    provenance: dict[str, Any] = Field(default_factory=dict)
    # Soft label: the probability that ``chosen`` is the better answer (e.g. from AI feedback, in
    # [0.5, 1]); None means a hard label (probability 1).
    label: float | None = Field(default=None, ge=0.0, le=1.0)
    # True: that answer was cut at the generation limit (Completion.truncated); it is trained without EOS.
    chosen_truncated: bool = False
    rejected_truncated: bool = False


class RevisionStep(BaseModel):
    """One critique → revision round of Constitutional AI."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    principle: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str


class Revision(Record):
    """A red-team prompt, the model's initial response, every critique and revision, and the final
    revision (the SFT target)."""

    kind: ClassVar[str] = "revision"
    id: str = Field(min_length=1)
    prompt: Text
    initial: str
    steps: list[RevisionStep] = Field(default_factory=list)
    final: str
    # True: the final answer was cut at max_new_tokens (no EOS, no stop string); SFT gives it no EOS.
    final_truncated: bool = False
    model: str = ""


def render_text(text: Text) -> str:
    """A conversation as plain text (``role: content`` lines); plain text unchanged.

    Used where a model has no chat template; models that have one get `apply_chat_template` instead.
    """
    if isinstance(text, str):
        return text
    return "\n".join(f"{m.role}: {m.content}" for m in text)
