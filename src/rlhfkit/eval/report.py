"""One self-contained HTML report of a run: the headline (the labelers' criterion where it is known,
relevance, diversity, KL — each with its interval), the proxy apart, per-seed results, the
over-optimisation picture (proxy and gold against KL per training step), the reward model's accuracy,
monitor warnings, training curves, judge distributions, labeler agreement, samples before and after,
and the config. Plots are matplotlib PNGs embedded as data URIs, so the file can be mailed around.

Every text from a run (prompts, completions, names, messages) is HTML-escaped: a completion that
starts with "<script>" is shown, never run. Numbers are rounded to 3 decimals.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from markupsafe import Markup, escape

from rlhfkit.data.records import Completion, render_text
from rlhfkit.eval.metrics import Comparison

CURVES = [("reward/score", "proxy: reward model score"), ("judge/gold", "gold: the labelers' criterion"),
          ("kl/kl", "KL to reference (nats/seq)"), ("monitor/relevance", "relevance"),
          ("monitor/judge", "independent judge"), ("monitor/template_share", "share on one template"),
          ("policy/entropy", "entropy (nats/token)"), ("response/length", "response length (tokens)"),
          ("monitor/distinct_2", "distinct-2")]

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#176f2c;font-weight:bold}.bad{color:#a11;font-weight:bold}pre{background:#f7f7f7;padding:1em;
overflow:auto}img{max-width:100%}.warn{background:#fff4d6;padding:.5em 1em;border-left:4px solid #e0a800}"""


def subplots(*args, **kwargs):
    """matplotlib's ``subplots`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def png_base64(figure, dpi: int = 90) -> str:
    """The figure as base64 PNG (for a data: URI); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _png(figure) -> Markup:
    return Markup(f'<img src="data:image/png;base64,{png_base64(figure)}">')


def _fmt(value, digits: int = 3) -> str:
    """A cell's text: floats rounded, None/NaN as –, anything else as its string (escaped by the caller)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> Markup:
    """A table; cells are escaped unless they are ``Markup`` made here."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{escape(_fmt(v))}</td>' if isinstance(v, int | float) and not isinstance(v, bool)
        else f"<td>{v if isinstance(v, Markup) else escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return Markup(f"<table><tr>{head}</tr>{body}</table>")


def _interval(low: float, high: float) -> str:
    return f"[{low:+.3f}, {high:+.3f}]"


def _verdict(text: str) -> Markup:
    css = "good" if text == "improved" else "bad" if text in ("worse", "seeds disagree") else ""
    return Markup(f'<span class="{css}">{escape(text)}</span>')


def comparison_table(comparisons: Mapping[str, Comparison], verdicts: Mapping[str, str] | None = None,
                     independent: Mapping[str, bool] | None = None) -> Markup:
    rows = [[name, "higher" if c.higher_is_better else "lower",
             _fmt((independent or {}).get(name)), c.before, c.after, c.difference, _interval(c.ci_low, c.ci_high),
             f"{c.win_rate:.2f} [{c.win_low:.2f}, {c.win_high:.2f}]", _verdict((verdicts or {}).get(name, c.verdict)),
             f"{c.prompts} ({c.clusters} groups)", c.samples] for name, c in comparisons.items()]
    return _table(["measure", "better", "independent of the reward model", "before", "after", "after − before",
                   "95% CI", "per-prompt win rate [95% CI]", "verdict", "prompts", "samples/side"], rows)


def curves(histories: Mapping[str, Sequence[dict]]) -> Markup:
    """Every logged curve per training step, one line per run (training seed)."""
    shown = [(key, label) for key, label in CURVES if any(key in row for h in histories.values() for row in h)]
    if not shown:
        return Markup("<p>no training steps were logged</p>")
    columns = 3
    figure, axes = subplots(-(-len(shown) // columns), columns, figsize=(12, 3.2 * -(-len(shown) // columns)),
                            squeeze=False)
    for ax, (key, label) in zip(axes.flat, shown, strict=False):
        for run, history in histories.items():
            points = [(row["step"], row[key]) for row in history if key in row]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", linewidth=1, label=run)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    return _png(figure)


def over_optimisation(histories: Mapping[str, Sequence[dict]]) -> Markup:
    """Proxy (reward model) and gold (the labelers' criterion) against KL to the reference, per PPO
    step (Gao et al. 2022): the proxy keeps rising with KL; when gold turns down, the policy is
    over-optimising the reward model."""
    figure, axes = subplots(1, 2, figsize=(11, 3.6), squeeze=False)
    for ax, (key, label) in zip(axes.flat, [("reward/score", "proxy (reward model)"),
                                             ("judge/gold", "gold (labelers' criterion)")], strict=True):
        for run, history in histories.items():
            points = sorted((row["kl/kl"], row[key]) for row in history if key in row and "kl/kl" in row)
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", linewidth=1, label=run)
        ax.set_xlabel("KL to the reference (nats/seq)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(figure)


def judge_distributions(before: Sequence[Completion], after: Sequence[Completion], keys: Sequence[str]) -> Markup:
    figure, axes = subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=True):
        values = [c.scores[key] for c in [*before, *after]]
        low, high = min(values), max(values)
        bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 10
        ax.hist([c.scores[key] for c in before], bins=bins, alpha=0.6, label="before")
        ax.hist([c.scores[key] for c in after], bins=bins, alpha=0.6, label="after")
        ax.set_title(key, fontsize=10)
        ax.legend()
    return _png(figure)


def sample_rows(before: Sequence[Completion], after: Sequence[Completion], keys: Sequence[str],
                limit: int) -> list[list[str]]:
    """The first sample of each prompt before and after, with its scores."""
    def shown(c: Completion) -> str:
        return f"{c.text}  ({', '.join(f'{k} {c.scores[k]:.2f}' for k in keys if k in c.scores)})"

    first_after: dict[str, Completion] = {}
    for c in after:
        first_after.setdefault(c.prompt_id, c)
    rows, seen = [], set()
    for c in before:
        if c.prompt_id not in seen and c.prompt_id in first_after and len(rows) < limit:
            seen.add(c.prompt_id)
            rows.append([render_text(c.prompt), shown(c), shown(first_after[c.prompt_id])])
    return rows


def agreement_tables(agreement: dict) -> list[Markup]:
    return [_table(["items", "labelers", "pairwise agreement", "Krippendorff α (ordinal)", "mean Kendall W",
                    "poor labelers"],
                   [[agreement["items"], agreement["labelers"], agreement["pairwise_agreement"],
                     agreement["krippendorff_alpha"], agreement["mean_kendall_w"],
                     ", ".join(agreement["poor_labelers"]) or "none"]]),
            _table(["labeler", "items", "τ vs others", "tie rate", "flag rate", "poor", "why"],
                   [[s["labeler_id"], s["items"], s["tau"], s["tie_rate"], s["flag_rate"], s["poor"], s["reason"]]
                    for s in agreement["per_labeler"]])]


def write_report(path: str | os.PathLike, title: str, headline: Mapping[str, Comparison],
                 before: Sequence[Completion], after: Sequence[Completion], *, config: dict,
                 verdicts: Mapping[str, str] | None = None, independent: Mapping[str, bool] | None = None,
                 conclusions: Sequence[str] = (), others: Mapping[str, Comparison] | None = None,
                 proxy: Mapping[str, Comparison] | None = None, seed_rows: Sequence[dict] = (),
                 reward_model: Sequence[dict] = (), text_stats: Mapping[str, Mapping[str, float]] | None = None,
                 histories: Mapping[str, Sequence[dict]] | None = None, agreement: dict | None = None,
                 monitor_events: Sequence[dict] = (), samples: int = 12) -> Path:
    """Write the report. ``headline``: the comparisons the result rests on; ``others``: further judges;
    ``proxy``: the reward model's own comparisons (per seed), shown apart; ``verdicts`` override a
    comparison's own verdict (e.g. the seed-aware one); ``conclusions``: lines shown first."""
    parts = [Markup("<!doctype html><meta charset='utf-8'><title>{}</title><style>{}</style><h1>{}</h1>").format(
        title, Markup(STYLE), title)]
    parts += [Markup("<p><b>{}</b></p>").format(line) for line in conclusions]
    parts += [Markup("<h2>Result on held-out prompts</h2><p>Per-prompt mean scores, after − before, with a 95% "
                     "interval over groups of prompts (a delete-a-group jackknife with Student t quantiles: "
                     "prompts about one topic move together). KL is after only: before, the policy is the "
                     "reference.</p>"), comparison_table(headline, verdicts, independent)]
    if others:
        parts += [Markup("<h3>Other judges</h3>"), comparison_table(others, verdicts, independent)]
    if proxy:
        parts += [Markup("<h2>The proxy (not evidence)</h2><p>The reward model the policy was trained against, "
                         "scoring the same samples. It rises by construction; only the judges above say whether the "
                         "answers got better.</p>"), comparison_table(proxy)]
    if seed_rows:
        keys = list(seed_rows[0])
        parts += [Markup("<h2>Per training seed</h2>"), _table(keys, [[row[k] for k in keys] for row in seed_rows])]
    if reward_model:
        keys = list(reward_model[0])
        parts += [Markup("<h2>Reward model</h2><p>Pairwise accuracy on pairs of held-out labeling prompts, "
                         "with a Wilson 95% interval.</p>"),
                  _table(keys, [[row[k] for k in keys] for row in reward_model])]
    if text_stats:
        keys = list(next(iter(text_stats.values())))
        parts += [Markup("<h2>Text statistics</h2>"),
                  _table(["", *keys], [[side, *(stats[k] for k in keys)] for side, stats in text_stats.items()])]
    parts.append(Markup("<h2>Reward-hacking monitor</h2>"))
    parts += [Markup('<p class="warn">{} step {} · {}: {}</p>').format(e.get("run", ""), e["step"], e["kind"],
                                                                         e["message"]) for e in monitor_events]
    if not monitor_events:
        parts.append(Markup("<p>no warnings (reward vs independent judge, relevance, KL, length, diversity and "
                            "template share stayed within bounds)</p>"))
    if histories:
        parts += [Markup("<h2>Over-optimisation: proxy and gold against KL</h2>"), over_optimisation(histories),
                  Markup("<h2>Training curves</h2>"), curves(histories)]
    keys = [k for k in headline if all(k in c.scores for c in [*before, *after])]
    keys += [k for k in (others or {}) if all(k in c.scores for c in [*before, *after])]
    if keys:
        parts += [Markup("<h2>Judge scores before vs after</h2>"), judge_distributions(before, after, keys)]
    if agreement:
        parts += [Markup("<h2>Labelers</h2>"), *agreement_tables(agreement)]
    parts += [Markup("<h2>Samples before and after (same held-out prompts)</h2>"),
              _table(["prompt", "before", "after"], sample_rows(before, after, keys, samples))]
    parts += [Markup("<h2>Configuration</h2><pre>{}</pre>").format(yaml.safe_dump(config, sort_keys=False)),
              Markup("<p>Training logs are also in TensorBoard format in the run folder.</p>")]
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
