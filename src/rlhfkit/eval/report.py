"""One self-contained HTML report of a run: config, training curves, judge scores before vs after with
confidence intervals, labeler agreement, monitor warnings and sample completions side by side.
Plots are drawn with matplotlib and embedded as PNG data URIs, so the file can be mailed around.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from rlhfkit.data.records import Completion, render_text
from rlhfkit.eval.metrics import Comparison

CURVES = [("reward/score", "reward (reward model)"), ("kl/kl", "KL to reference (nats/seq)"),
          ("policy/entropy", "entropy (nats/token)"), ("response/length", "response length (tokens)"),
          ("monitor/judge", "independent judge"), ("monitor/distinct_2", "distinct-2")]

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


def _png(figure) -> str:
    return f'<img src="data:image/png;base64,{png_base64(figure)}">'


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_fmt(v)}</td>' if isinstance(v, int | float) and not isinstance(v, bool)
        else f"<td>{v if isinstance(v, str) and v.startswith('<') else _fmt(v)}</td>" for v in row) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def training_curves(history: Sequence[dict]) -> str:
    shown = [(key, label) for key, label in CURVES if any(key in row for row in history)]
    if not shown:
        return "<p>no training steps were logged</p>"
    columns = 3
    rows = -(-len(shown) // columns)
    figure, axes = subplots(rows, columns, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, shown, strict=False):
        points = [(row["step"], row[key]) for row in history if key in row]
        ax.plot(*zip(*points, strict=True), marker=".", linewidth=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    return _png(figure)


def judge_distributions(before: Sequence[Completion], after: Sequence[Completion], keys: Sequence[str]) -> str:
    figure, axes = subplots(1, len(keys), figsize=(5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=True):
        low = min(c.scores[key] for c in [*before, *after])
        high = max(c.scores[key] for c in [*before, *after])
        bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 10
        ax.hist([c.scores[key] for c in before], bins=bins, alpha=0.6, label="before")
        ax.hist([c.scores[key] for c in after], bins=bins, alpha=0.6, label="after")
        ax.set_title(key, fontsize=10)
        ax.legend()
    return _png(figure)


def write_report(path: str | os.PathLike, title: str, summary: dict, config: dict, history: Sequence[dict],
                 before: Sequence[Completion], after: Sequence[Completion], comparisons: dict[str, Comparison],
                 text_stats: dict[str, dict[str, float]], agreement: dict | None = None,
                 monitor_events: Sequence[dict] = (), samples: int = 8) -> Path:
    """Write the report; ``comparisons`` maps each judge to its before/after comparison."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    rows = []
    for key, c in comparisons.items():
        css = "good" if c.verdict == "improved" else "bad" if c.verdict == "worse" else ""
        verdict = f'<span class="{css}">{html.escape(c.verdict)}</span>'
        rows.append([key, c.before, c.after, c.difference, f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]", verdict,
                     c.prompts, c.samples])
    parts += ["<h2>Result: independent judges on held-out prompts</h2>",
              "<p>Per-prompt mean scores, after − before, with a 95% paired bootstrap interval over prompts. "
              "The judges are not the reward the policy was trained on.</p>",
              _table(["judge", "before", "after", "difference", "95% CI", "verdict", "prompts", "samples/side"], rows)]
    stat_keys = list(next(iter(text_stats.values()), {}))
    parts.append(_table(["", *stat_keys], [[side, *(text_stats[side][k] for k in stat_keys)] for side in text_stats]))
    headline = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
    parts += ["<h2>Run summary</h2>", _table(["", "value"], [[k, v] for k, v in headline.items()])]
    if monitor_events:
        parts.append("<h2>Reward-hacking monitor</h2>")
        parts += [f'<p class="warn">step {e["step"]} · {html.escape(e["kind"])}: {html.escape(e["message"])}</p>'
                  for e in monitor_events]
    else:
        parts.append("<h2>Reward-hacking monitor</h2><p>no warnings (reward vs independent judge, KL, length "
                     "and diversity stayed within bounds)</p>")
    parts += ["<h2>Training curves</h2>", training_curves(history)]
    parts += ["<h2>Judge scores before vs after</h2>", judge_distributions(before, after, list(comparisons))]
    if agreement:
        parts += ["<h2>Labelers</h2>", _table(["items", "labelers", "pairwise agreement", "Krippendorff α (ordinal)",
                                              "mean Kendall W", "poor labelers"],
                                             [[agreement["items"], agreement["labelers"],
                                               agreement["pairwise_agreement"], agreement["krippendorff_alpha"],
                                               agreement["mean_kendall_w"],
                                               ", ".join(agreement["poor_labelers"]) or "none"]])]
        parts.append(_table(["labeler", "items", "τ vs others", "tie rate", "flag rate", "poor", "why"],
                            [[s["labeler_id"], s["items"], s["tau"], s["tie_rate"], s["flag_rate"],
                              "yes" if s["poor"] else "no", s["reason"]] for s in agreement["per_labeler"]]))
    parts.append("<h2>Samples before and after (same held-out prompts)</h2>")
    first_key = next(iter(comparisons))
    by_prompt_after = {}
    for c in after:
        by_prompt_after.setdefault(c.prompt_id, c)
    rows, seen = [], set()
    for c in before:
        if c.prompt_id in seen or c.prompt_id not in by_prompt_after or len(rows) >= samples:
            continue
        seen.add(c.prompt_id)
        a = by_prompt_after[c.prompt_id]
        rows.append([render_text(c.prompt), f"{c.text} ({first_key} {c.scores[first_key]:.2f})",
                     f"{a.text} ({first_key} {a.scores[first_key]:.2f})"])
    parts.append(_table(["prompt", "before", "after"], rows))
    parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>",
              "<p>Training logs are also in TensorBoard format in the run folder.</p>"]
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
