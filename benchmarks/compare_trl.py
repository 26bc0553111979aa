"""rlhfkit against TRL on the shared workload (../shared/bench): both sides, back to back, one ratio table.

For each workload (reward model, DPO, GRPO, RLOO, PPO) and each seed, TRL's runner (from its virtualenv,
``run_<work>.py``) then rlhfkit's (``reward_model.py`` / ``rl_workload.py``, with this Python) do the same
work, one process at a time. The table gives per workload, over the seeds:

    ratio      = median_s(rlhfkit) / median_s(TRL)       median s/step of each run over steps 6–50, the
                                                         median of those over seeds; target ≤ 0.5
    RSS ratio  = peak_RSS(rlhfkit) / peak_RSS(TRL)       the largest peak RSS over seeds; target ≤ 1
    trend      = mean of the metric over the first 5 steps → over the last 5 (mean over seeds, and the
                 range of the gains last − first); learning is met when rlhfkit's last-5 mean ≥ TRL's (both
                 start from the same weights: where they end is how far they learned; a gain would punish
                 a side whose first 5 batches happened to be learned faster)
    other CPU  = CPU seconds other processes used during a run; a pair with a run above 2 s is
                 unreliable (the machine was not idle; timings and RSS of that pair do not count)

All runs' results and the table go to a new ``benchmarks/results/compare_trl-<UTC time>.json``. The exit
status is 1 if a runner failed (the others still run). Seeds are the workload's SEED, SEED + 1, ...: they
move the order of pairs/prompts and the sampling on both sides; initial weights and data stay the same.

    python benchmarks/compare_trl.py [--only dpo,grpo] [--seeds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOADS = ("reward", "dpo", "grpo", "rloo", "ppo")
STEP_TIME_TARGET = 0.5  # rlhfkit s/step ≤ 0.5 × TRL's
RSS_TARGET = 1.0  # rlhfkit peak RSS ≤ TRL's
OTHER_CPU_LIMIT_S = 2.0  # a run during which other processes used more CPU than this is unreliable


def code_digest() -> str:
    """A digest of the code an rlhfkit run executes (rlhfkit's source and this folder's scripts): a result kept
    from a run of other code has another, and is not reused as this code's (learning_vs_trl.py)."""
    digest = hashlib.sha256()
    for path in sorted([*(HERE.parent / "src" / "rlhfkit").rglob("*.py"), *HERE.glob("*.py")]):
        digest.update(path.relative_to(HERE.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Metric:
    """The learning metric of a workload, under the key each side logs it."""

    label: str
    trl_key: str
    rlhfkit_key: str


METRICS = {
    "reward": [Metric("accuracy", "accuracy", "accuracy")],
    "dpo": [Metric("margin", "rewards/margins", "margin"), Metric("accuracy", "rewards/accuracies", "accuracy")],
    "grpo": [Metric("reward", "reward", "reward/score")],
    "rloo": [Metric("reward", "reward", "reward/score")],
    "ppo": [Metric("reward", "objective/scores", "reward/score")],
}


def trl_command(work: str, seed: int, bench_dir: Path, trl_venv: Path, trl_ppo_venv: Path) -> list[str]:
    """TRL's runner for ``work`` (PPO needs TRL 1.12, the last release with a PPO trainer)."""
    venv = trl_ppo_venv if work == "ppo" else trl_venv
    return [str(venv / "bin" / "python"), str(HERE / "trl_seeded.py"), str(seed), str(bench_dir / f"run_{work}.py")]


def rlhfkit_command(work: str, seed: int, bench_dir: Path) -> list[str]:
    script = ["reward_model.py"] if work == "reward" else ["rl_workload.py", work]
    return [sys.executable, str(HERE / script[0]), *script[1:], "--seed", str(seed), "--bench-dir", str(bench_dir)]


def run_one(command: list[str], results_dir: Path, log: Path) -> dict:
    """Run one runner with its own results folder; returns its result JSON, or {"failed": ...}."""
    results_dir.mkdir(parents=True)
    env = os.environ | {"RLHF_BENCH_RESULTS": str(results_dir), "HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"),
                                                                   os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    found = sorted(results_dir.glob("*.json"))
    if code != 0 or len(found) != 1:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return {"failed": f"exit {code}, {len(found)} result files; log {log}: {tail[0][:200]}"}
    return json.loads(found[0].read_text())


def trend(result: dict, key: str) -> tuple[float, float] | None:
    """(mean over the first 5 steps, over the last 5) of a logged metric, as bench_common recorded it."""
    t = result.get("trends", {}).get(key) or {}
    return (t["first_k_mean"], t["last_k_mean"]) if "first_k_mean" in t else None


def side_summary(results: list[dict], work: str, side: str) -> dict:
    """One side of a workload over its seeds: median s/step, largest peak RSS, gen tok/s, other CPU, trends."""
    ok = [r for r in results if "failed" not in r]
    if not ok:
        return {"runs": len(results), "failed": len(results)}
    gen = [r["gen_tokens_per_s_steady"] for r in ok if r.get("gen_tokens_per_s_steady")]
    trends = {}
    for metric in METRICS[work]:
        pairs = [p for p in (trend(r, getattr(metric, f"{side}_key")) for r in ok) if p is not None]
        if pairs:
            trends[metric.label] = {"first": statistics.mean(p[0] for p in pairs),
                                    "last": statistics.mean(p[1] for p in pairs),
                                    "gains": [p[1] - p[0] for p in pairs]}
    return {"runs": len(results), "failed": len(results) - len(ok),
            "median_step_s": statistics.median(r["median_step_s"] for r in ok),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
            "gen_tokens_per_s": statistics.median(gen) if gen else None,
            "other_cpu_s": max(r["contention"]["other_cpu_s"] for r in ok),
            "trends": trends}


def compare(work: str, trl: dict, rlhfkit: dict) -> dict:
    """The table row of one workload from both sides' summaries: ratios, targets, learning, reliability."""
    row = {"work": work, "trl": trl, "rlhfkit": rlhfkit}
    if trl.get("failed") or rlhfkit.get("failed"):
        return row | {"complete": False}
    step_ratio = rlhfkit["median_step_s"] / trl["median_step_s"]
    rss_ratio = rlhfkit["peak_rss_mib"] / trl["peak_rss_mib"]
    learning = {label: rlhfkit["trends"][label]["last"] >= t["last"]
                for label, t in trl["trends"].items() if label in rlhfkit["trends"]}
    return row | {"complete": True,
                  "step_ratio": step_ratio, "step_target": STEP_TIME_TARGET, "step_met": step_ratio <= STEP_TIME_TARGET,
                  "rss_ratio": rss_ratio, "rss_target": RSS_TARGET, "rss_met": rss_ratio <= RSS_TARGET,
                  "learning_met": learning,
                  "reliable": max(trl["other_cpu_s"], rlhfkit["other_cpu_s"]) <= OTHER_CPU_LIMIT_S}


def _trend_text(summary: dict, label: str) -> str:
    t = summary["trends"].get(label)
    if t is None:
        return "–"
    gains = t["gains"]
    spread = f" (gain {min(gains):+.3f}…{max(gains):+.3f})" if len(gains) > 1 else ""
    return f"{t['first']:.3f} → {t['last']:.3f}{spread}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


TABLE_HEADER = ["work", "TRL s/step", "rlhfkit s/step", "ratio", "target", "met?", "TRL RSS MiB", "rlhfkit RSS MiB",
                "RSS ratio (≤ 1)", "met?", "learning, first 5 → last 5 steps: TRL", "rlhfkit",
                "learning met? (last 5 ≥ TRL's)",
                "gen tok/s TRL / rlhfkit", "other CPU s TRL / rlhfkit"]


def table(rows: list[dict]) -> str:
    """The markdown ratio table of :func:`compare` rows."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for row in rows:
        trl, kit = row["trl"], row["rlhfkit"]
        if not row["complete"]:
            failed = [side for side, s in (("TRL", trl), ("rlhfkit", kit)) if s.get("failed")]
            lines.append(f"| {row['work']} | " + f"{' and '.join(failed)} runner failed |" + " |" * 13)
            continue
        gen = " / ".join("–" if s["gen_tokens_per_s"] is None else f"{s['gen_tokens_per_s']:.0f}" for s in (trl, kit))
        other = f"{trl['other_cpu_s']:.1f} / {kit['other_cpu_s']:.1f}" + ("" if row["reliable"] else " unreliable")
        labels = list(trl["trends"])
        cells = [row["work"], f"{trl['median_step_s']:.3f}", f"{kit['median_step_s']:.3f}",
                 f"{row['step_ratio']:.2f}", f"≤ {row['step_target']}", _yes(row["step_met"]),
                 f"{trl['peak_rss_mib']:.0f}", f"{kit['peak_rss_mib']:.0f}", f"{row['rss_ratio']:.2f}",
                 _yes(row["rss_met"]),
                 "; ".join(f"{label} {_trend_text(trl, label)}" for label in labels),
                 "; ".join(f"{label} {_trend_text(kit, label)}" for label in labels),
                 ", ".join(f"{label} {_yes(met)}" for label, met in row["learning_met"].items()), gen, other]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform()}


def new_result_path(folder: Path) -> Path:
    """benchmarks/results/compare_trl-<UTC time>.json, never an existing file."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path, n = folder / f"compare_trl-{stamp}.json", 1
    while path.exists():
        path, n = folder / f"compare_trl-{stamp}-{n}.json", n + 1
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path.home() / ".cache" / "rlhf-bench"
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads among {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per side and workload (seeds SEED, SEED + 1, ...)")
    parser.add_argument("--bench-dir", type=Path, default=HERE.parents[1] / "shared" / "bench")
    parser.add_argument("--trl-venv", type=Path, default=cache / "venv-trl", help="TRL 1.16 (reward, DPO, GRPO, RLOO)")
    parser.add_argument("--trl-ppo-venv", type=Path, default=cache / "venv-trl-ppo", help="TRL 1.12 (PPO)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder of the JSON written")
    args = parser.parse_args()
    works = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(works) - set(WORKLOADS))
    if unknown or not works:
        parser.error(f"--only: unknown workload {', '.join(unknown) or '(none given)'}; choose among "
                     f"{', '.join(WORKLOADS)}")
    if args.seeds < 1:
        parser.error("--seeds: must be at least 1")
    for flag, venv in (("--trl-venv", args.trl_venv), ("--trl-ppo-venv", args.trl_ppo_venv)):
        if not (venv / "bin" / "python").exists() and (flag == "--trl-venv" or "ppo" in works):
            parser.error(f"{flag}: no Python at {venv / 'bin' / 'python'}; create the TRL environments with "
                         f"{args.bench_dir / 'setup_trl_venvs.sh'}")
    if not (args.bench_dir / "workload.py").exists():
        parser.error(f"--bench-dir: {args.bench_dir} has no workload.py (the shared workload)")
    args.works = works
    return args


def main() -> int:
    args = parse_args()
    sys.path.insert(0, str(args.bench_dir))
    import workload as W

    seeds = [W.SEED + i for i in range(args.seeds)]
    scratch = Path(tempfile.mkdtemp(prefix="compare_trl-"))
    runs: dict[str, dict[str, list[dict]]] = {}
    for work in args.works:
        runs[work] = {"trl": [], "rlhfkit": []}
        for seed in seeds:  # each pair back to back, never two processes at once
            for side, command in (("trl", trl_command(work, seed, args.bench_dir, args.trl_venv, args.trl_ppo_venv)),
                                  ("rlhfkit", rlhfkit_command(work, seed, args.bench_dir))):
                print(f"{work} seed {seed}: {side} ...", flush=True)
                name = f"{work}-{seed}-{side}"
                result = run_one(command, scratch / name, scratch / f"{name}.log")
                result["seed"] = seed
                runs[work][side].append(result)
                if "failed" in result:
                    print(f"  FAILED: {result['failed']}", flush=True)
    rows = [compare(work, side_summary(r["trl"], work, "trl"), side_summary(r["rlhfkit"], work, "rlhfkit"))
            for work, r in runs.items()]
    text = table(rows)
    path = new_result_path(args.results)
    host = machine()
    path.write_text(json.dumps({"machine": host, "seeds": seeds, "logs": str(scratch), "table": text,
                                "rows": rows, "runs": runs}, indent=1, default=str))
    print(text)
    for side in ("trl", "rlhfkit"):
        versions = {(k, v) for r in runs.values() for result in r[side] for k, v in result.get("versions", {}).items()}
        print(f"{side}: " + ", ".join(f"{k} {v}" for k, v in sorted(versions)))
    print(f"{host}\n{len(seeds)} seed(s) per side; logs in {scratch}; written {path}")
    return 0 if all(row["complete"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
