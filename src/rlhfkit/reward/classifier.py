"""A sequence classifier as a reward: the logit (or probability) of one named label.

E.g. ``ClassifierReward.from_pretrained("facebook/roberta-hate-speech-dynabench-r4-target",
label="nothate")`` rewards completions the hate-speech classifier finds not hateful, as in the
course lab's detoxification recipe.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from rlhfkit.models.pretrained import pretrained_source


def label_index(model: PreTrainedModel, label: str | int) -> int:
    """The output index of ``label`` (a name from ``config.label2id``, or an index)."""
    num_labels = model.config.num_labels
    if isinstance(label, int):
        if not 0 <= label < num_labels:
            raise ValueError(f"label index {label} out of range: the classifier has {num_labels} labels")
        return label
    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    if label not in label2id:
        raise ValueError(f"label {label!r} is not one of the classifier's labels {sorted(label2id)}")
    return label2id[label]


class ClassifierReward:
    """reward = logit_label(x) (or softmax probability), x = the completion (optionally after the prompt)."""

    def __init__(self, model: PreTrainedModel, tokenizer, label: str | int,
                 output: Literal["logit", "probability"] = "logit", include_prompt: bool = False,
                 batch_size: int = 32, max_length: int = 512) -> None:
        if output not in ("logit", "probability"):
            raise ValueError(f"output must be 'logit' or 'probability', not {output!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.index = label_index(model, label)
        self.output, self.include_prompt = output, include_prompt
        self.batch_size, self.max_length = batch_size, max_length
        self.name = f"classifier:{label}"

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, label: str | int, **kwargs) -> ClassifierReward:
        source = pretrained_source(name_or_path, "classifier")
        model = AutoModelForSequenceClassification.from_pretrained(source)
        return cls(model, AutoTokenizer.from_pretrained(source), label, **kwargs)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        values = []
        for start in range(0, len(completions), self.batch_size):
            texts = list(completions[start:start + self.batch_size])
            pair = list(prompts[start:start + self.batch_size]) if self.include_prompt else None
            encoded = self.tokenizer(*([pair, texts] if pair else [texts]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.model.device)
            logits = self.model(**encoded).logits.float()
            if self.output == "probability":
                logits = logits.softmax(-1)
            values.append(logits[:, self.index].cpu())
        return torch.cat(values) if values else torch.zeros(0)
