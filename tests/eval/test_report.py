"""The report shows every text escaped and rounds its numbers."""

from rlhfkit.data.records import Completion
from rlhfkit.eval.metrics import paired_comparison
from rlhfkit.eval.report import write_report


def samples(texts, model):
    return [Completion(id=f"{model}-{i}", prompt_id=f"p{i}", prompt=f"<b>prompt {i}</b>", text=t, index=0,
                       model=model, scores={"relevance": 0.123456 * i, "kl": 0.0})
            for i, t in enumerate(texts)]


def test_a_completion_that_starts_with_a_script_tag_is_shown_not_run(tmp_path):
    before = samples(["<script>alert('before')</script>", "fine", "<img src=x onerror=alert(1)>"], "before")
    after = samples(["<script>alert('after')</script>", "fine too", "ok"], "after")
    scores = {c.prompt_id: [c.scores["relevance"]] for c in before}
    comparison = paired_comparison(scores, {p: [v[0] + 0.1] for p, v in scores.items()})
    path = write_report(tmp_path / "report.html", "<title> of a run", {"relevance": comparison}, before, after,
                        config={"note": "</pre><script>x</script>"}, conclusions=["<i>verdict</i>"],
                        monitor_events=[{"step": 1, "kind": "kl", "message": "<b>high</b>"}],
                        seed_rows=[{"seed": 0, "stop_reason": "<script>"}])
    report = path.read_text()
    for raw in ("<script>", "<img src=x", "<b>high", "<b>prompt", "<i>", "<title> of"):
        assert raw not in report
    assert "&lt;script&gt;alert(&#39;after&#39;)&lt;/script&gt;" in report
    assert "&lt;b&gt;prompt 0&lt;/b&gt;" in report
    assert "0.100" in report and "0.123456" not in report  # rounded
