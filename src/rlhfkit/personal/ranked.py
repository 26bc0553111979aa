"""Pairs ranked by a user's preference head: training answers the user never saw, chosen as they would.

A user's own pairs hold only the answers they were shown. DPO on 70–100 of them, trained long enough for a
taste to win, concentrated the toy demo's answers on the few that satisfy the taste every time
(benchmarks/results/personal_tastes.md, runs 57–77). The user's preference head (rlhfkit.personal.rerank)
ranks any answer. For each question x the user asked (once per distinct question):

    y_1 … y_N ~ π_s(· | x)                  at the served temperature; s: the version's starting point
    y⁺ = argmax_j r_u(x, y_j),   y⁻ = argmin_j r_u(x, y_j)
    (x, y⁺, y⁻) joins the user's own pairs when r_u(x, y⁺) > r_u(x, y⁻)

so that DPO, and the NLL term on chosen answers, see the best of N as the head sees it on every question
(best-of-N distillation). These pairs exist only inside the training that made them: nothing is stored, and
a deletion removes the pairs and the head they come from.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlhfkit.data.records import PreferencePair
from rlhfkit.personal.models import PersonalModels, PromptTooLong, user_owner
from rlhfkit.personal.rerank import Reranker


def ranked_pairs(models: PersonalModels, reranker: Reranker, user_id: int, pairs: Sequence[PreferencePair],
                 questions: Sequence[str], temperature: float, max_new_tokens: int, seed: int) -> list[PreferencePair]:
    """One pair per distinct question in ``questions``, as above, from ``reranker.config.ranked_pairs`` samples
    of the user's starting point; none while the user's head does not exist (fewer pairs than
    ``rerank.min_pairs``) or when it is off (0). Question i is sampled with seed ``seed + i``. A question too
    long for the model (it was asked under another limit) gives no pair."""
    n = reranker.config.ranked_pairs
    head = reranker.head(user_id, pairs) if n else None
    if head is None:
        return []
    start = models.starting_point(user_owner(user_id))
    prompts, samples = [], []
    for i, question in enumerate(dict.fromkeys(questions)):
        try:
            with models.lock:  # the starting point's weights cannot change mid-sample; asks wait between questions
                samples.append(models.answers(question, start, n, temperature, max_new_tokens, seed + i))
        except PromptTooLong:
            continue
        prompts.append(question)
    if not prompts:
        return []
    texts = [a.text for answers in samples for a in answers]
    scores = (reranker.features([p for p in prompts for _ in range(n)], texts) @ head.weights).view(-1, n)
    ranked = []
    for prompt, answers, row in zip(prompts, samples, scores, strict=True):
        best, worst = answers[int(row.argmax())], answers[int(row.argmin())]
        if row.max() > row.min():
            ranked.append(PreferencePair(prompt=prompt, chosen=best.text, rejected=worst.text,
                                         prompt_id=f"ranked-{user_id}-{len(ranked)}",
                                         provenance={"source": "ranked", "user_id": user_id, "n": n},
                                         chosen_truncated=best.truncated, rejected_truncated=worst.truncated))
    return ranked
