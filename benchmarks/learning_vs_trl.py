"""Does rlhfkit's GRPO / RLOO / DPO learn at least as well as TRL's? Both sides over N seeds, learning only.

For each seed and workload, TRL's runner (``trl_seeded.py`` around ``../shared/bench/run_<algo>.py``) and
rlhfkit's (``rl_workload.py``) run one after the other with 1 torch thread (learning does not depend on
the machine's load; step times are not looked at). Each run's result goes to ``--runs/<algo>/<side>/<seed>/``;
a run whose whole result is there already is not run again (a failed one, one cut short while writing
it, and an rlhfkit run of other code than this checkout's are), so an interrupted comparison continues
where it stopped. Per workload, metric (``compare_trl.METRICS``: the reward; DPO's margin and accuracy)
and side it takes each seed's mean over the last 5 steps, x_s, and prints

    mean x̄ of each side, and Δ = x̄_rlhfkit − x̄_TRL with its 95% Welch interval
    Δ ± t_{0.975, ν} · √(s²_r/n_r + s²_T/n_T),   ν = (s²_r/n_r + s²_T/n_T)² / Σ (s²/n)² / (n − 1)

(the seeds of the two sides taken as unpaired: at one seed both sides train on the same prompts or
pairs in the same order (``data_order_vs_trl.py``), and GRPO/RLOO draw their samples from different
streams). The verdict reads the interval: "below" when it lies under 0, "above" over 0, else "no
difference found" with the smallest Δ the data allow. Also printed, over the seeds both sides ran: the
paired interval d̄ ± t_{0.975, n−1} · s_d/√n of d_s = x_s,rlhfkit − x_s,TRL (tight where the same data
leave nothing to chance: DPO), and the largest difference of the metric at any one step (0 where
rlhfkit trained exactly as TRL did). Everything goes to a new
``benchmarks/results/learning_vs_trl-<UTC time>.json``.

    PYTHONPATH=src python benchmarks/learning_vs_trl.py --seeds 8 [--algos grpo,rloo,dpo] [--sides trl,rlhfkit]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from compare_trl import METRICS, Metric, code_digest, run_one
from scipy import stats

HERE = Path(__file__).resolve().parent
LAST_K = 5
WORKLOADS = ("grpo", "rloo", "dpo")  # their metrics: compare_trl.METRICS (reward; DPO's margin and accuracy)
# side -> rl_workload.py's extra arguments (None: TRL's runner): rlhfkit's defaults (bf16 autocast where the CPU
# has a bf16 unit), in fp32 as TRL, with one ratio per completion (TRL's RLOO loss), sampling through `generate`,
# both of the last two (TRL's arithmetic and sampler: what the step-for-step replay in rl_on_trl_order.py ran)
SIDES = {"trl": None, "rlhfkit": [], "rlhfkit-fp32": ["--precision", "fp32"],
         "rlhfkit-completion": ["--action", "completion"], "rlhfkit-generate": ["--engine", "generate"],
         "rlhfkit-fp32-generate": ["--precision", "fp32", "--engine", "generate"]}
TRL_ONE_THREAD = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import workload
workload.NUM_THREADS = 1
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def command(side: str, algo: str, seed: int, bench_dir: Path, trl_venv: Path) -> list[str]:
    if side == "trl":
        return [str(trl_venv / "bin" / "python"), "-c", TRL_ONE_THREAD, str(bench_dir), str(HERE / "trl_seeded.py"),
                str(seed), str(bench_dir / f"run_{algo}.py")]
    return [sys.executable, str(HERE / "rl_workload.py"), algo, "--seed", str(seed), "--bench-dir", str(bench_dir),
            "--threads", "1", *SIDES[side]]


def metric_series(result: dict, metric: Metric) -> list[float]:
    """One runner's per-step series of ``metric``, under the key its side logs it."""
    trends = result["trends"]
    return (trends.get(metric.trl_key) or trends[metric.rlhfkit_key])["series"]


def first_and_last_k(series: list[float]) -> tuple[float, float]:
    """(mean over the first LAST_K steps, over the last LAST_K): compare_trl.py's trend."""
    return statistics.mean(series[:LAST_K]), statistics.mean(series[-LAST_K:])


def welch_interval(ours: list[float], theirs: list[float], confidence: float = 0.95) -> dict:
    """Δ = mean(ours) − mean(theirs) and its Welch t interval (unequal variances, unpaired samples)."""
    test = stats.ttest_ind(ours, theirs, equal_var=False)
    low, high = test.confidence_interval(confidence)
    return {"difference": statistics.mean(ours) - statistics.mean(theirs), "low": float(low), "high": float(high),
            "confidence": confidence, "p_value": float(test.pvalue)}


def paired_interval(ours: dict[int, float], theirs: dict[int, float], confidence: float = 0.95) -> dict:
    """Over the seeds both sides ran, d_s = ours_s − theirs_s: mean d̄ and its t interval
    d̄ ± t_{0.975, n−1} · s_d / √n. Meaningful where a seed gives both sides the same data order."""
    seeds = sorted(set(ours) & set(theirs))
    differences = [ours[s] - theirs[s] for s in seeds]
    low, high = stats.ttest_1samp(differences, 0.0).confidence_interval(confidence)
    return {"seeds": len(seeds), "difference": statistics.mean(differences), "low": float(low), "high": float(high),
            "confidence": confidence}


def max_step_difference(ours: dict[int, list[float]], theirs: dict[int, list[float]]) -> float:
    """The largest |ours − theirs| at any step of any seed both sides ran: 0 where they trained the same."""
    return max(abs(a - b) for s in set(ours) & set(theirs) for a, b in zip(ours[s], theirs[s], strict=True))


def verdict(interval: dict) -> str:
    """What the interval of Δ = rlhfkit − TRL says about "rlhfkit learns at least as well as TRL"."""
    if interval["high"] < 0:
        return f"below TRL: Δ ≤ {interval['high']:+.4f} at {interval['confidence']:.0%}"
    if interval["low"] > 0:
        return f"above TRL: Δ ≥ {interval['low']:+.4f} at {interval['confidence']:.0%}"
    return (f"no difference found: Δ {interval['difference']:+.4f}, between {interval['low']:+.4f} and "
            f"{interval['high']:+.4f} at {interval['confidence']:.0%}")


def summary(runs: dict[str, dict[str, dict[int, dict]]]) -> dict:
    """Per workload and metric: each side's per-seed first/last-5 means and mean, and each rlhfkit side
    against TRL."""
    out = {}
    for algo, sides in runs.items():
        entry = {}
        for metric in METRICS[algo]:
            per_side, series = {}, {}
            for side, results in sides.items():
                if results:
                    series[side] = {s: metric_series(results[s], metric) for s in sorted(results)}
                    trends = [first_and_last_k(values) for values in series[side].values()]
                    last = [t[1] for t in trends]
                    per_side[side] = {"seeds": sorted(results), "first5": [t[0] for t in trends], "last5": last,
                                      "mean_last5": statistics.mean(last)}
            against = {}
            for side, values in per_side.items():
                if side == "trl" or "trl" not in per_side:
                    continue
                trl = per_side["trl"]
                against[side] = {"difference": values["mean_last5"] - trl["mean_last5"],
                                 "verdict": "no interval: fewer than 2 seeds a side",
                                 "max_step_difference": max_step_difference(series[side], series["trl"])}
                if min(len(values["last5"]), len(trl["last5"])) >= 2:
                    interval = welch_interval(values["last5"], trl["last5"])
                    against[side] |= interval | {"verdict": verdict(interval)}
                if len(set(values["seeds"]) & set(trl["seeds"])) >= 2:
                    against[side]["paired"] = paired_interval(
                        dict(zip(values["seeds"], values["last5"], strict=True)),
                        dict(zip(trl["seeds"], trl["last5"], strict=True)))
            entry[metric.label] = {"sides": per_side, "against_trl": against}
        out[algo] = entry
    return out


def table(result: dict) -> str:
    """Markdown per workload and metric: one row per seed with every side's first 5 → last 5 mean, then the
    means and each rlhfkit side's verdict against TRL."""
    lines = []
    for algo, metrics in result.items():
        for label, entry in metrics.items():
            sides = entry["sides"]
            seeds = sorted({s for v in sides.values() for s in v["seeds"]})
            lines += [f"{algo.upper()} {label}", "", "| seed | " + " | ".join(sides) + " |",
                      "|---|" + "---|" * len(sides)]
            for seed in seeds:
                cells = []
                for values in sides.values():
                    i = values["seeds"].index(seed) if seed in values["seeds"] else None
                    cells.append("–" if i is None else f"{values['first5'][i]:.4f} → {values['last5'][i]:.4f}")
                lines.append(f"| {seed} | " + " | ".join(cells) + " |")
            lines.append("| mean last 5 | " + " | ".join(f"{v['mean_last5']:.4f} (n={len(v['last5'])})"
                                                       for v in sides.values()) + " |")
            lines += [""] + [f"{side} − trl: {c['verdict']}{welch_text(c)}{paired_text(c)}; largest difference at one "
                             f"step {c['max_step_difference']:.4f}"
                             for side, c in entry["against_trl"].items()] + [""]
    return "\n".join(lines)


def welch_text(comparison: dict) -> str:
    return f" (Welch p = {comparison['p_value']:.2f})" if "p_value" in comparison else \
        f" (Δ {comparison['difference']:+.4f})"


def paired_text(comparison: dict) -> str:
    paired = comparison.get("paired")
    return "" if paired is None else (f"; paired by seed ({paired['seeds']}): Δ̄ {paired['difference']:+.4f}, "
                                      f"{paired['low']:+.4f} to {paired['high']:+.4f}")


def finished(folder: Path) -> dict | None:
    """The result of the run in ``folder``: its one JSON file, read whole; None where there is none, more than
    one, or one that does not parse (a run killed while writing it), so that the run is run again."""
    found = list(folder.glob("*.json"))
    if len(found) != 1:
        return None
    try:
        result = json.loads(found[0].read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) and "trends" in result else None


def of_this_code(result: dict, side: str, code: str) -> bool:
    """Whether ``result`` is what this checkout's code would give: any TRL run; an rlhfkit run made by the code
    of the same digest (``compare_trl.code_digest``), not one kept from before a change."""
    return side == "trl" or result.get("code") == code


def collect(runs_dir: Path, algos: list[str], sides: list[str], code: str) -> dict[str, dict[str, dict[int, dict]]]:
    """Every finished run's result under ``runs_dir`` made by this code, by workload, side and seed (folders named
    by their seed; a run without a whole result is left out, and one of other code is named and left out)."""
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    for algo in algos:
        for side in sides:
            folders = [p for p in (runs_dir / algo / side).glob("*") if p.is_dir() and p.name.isdigit()]
            found = {int(p.name): result for p in folders if (result := finished(p)) is not None}
            stale = sorted(seed for seed, result in found.items() if not of_this_code(result, side, code))
            if stale:
                print(f"{algo} {side}: left out seeds {', '.join(map(str, stale))}, run by other code than this "
                      "checkout's (run without --collect-only to run them again)")
            runs.setdefault(algo, {})[side] = {s: r for s, r in found.items() if s not in stale}
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path.home() / ".cache" / "rlhf-bench"
    parser.add_argument("--seeds", type=int, default=8, help="seeds SEED, SEED + 1, ... per side")
    parser.add_argument("--algos", default="grpo,rloo", help=f"among {', '.join(WORKLOADS)}")
    parser.add_argument("--sides", default="trl,rlhfkit", help=f"among {', '.join(SIDES)}")
    parser.add_argument("--runs", type=Path, default=cache / "learning", help="each run's result folder")
    parser.add_argument("--collect-only", action="store_true", help="run nothing; summarise the runs there")
    parser.add_argument("--bench-dir", type=Path, default=HERE.parents[1] / "shared" / "bench")
    parser.add_argument("--trl-venv", type=Path, default=cache / "venv-trl")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    algos, sides = args.algos.split(","), args.sides.split(",")
    unknown = sorted(set(algos) - set(WORKLOADS)) + sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown workload or side: {', '.join(repr(name) for name in unknown)}")
    if args.seeds < 1 and not args.collect_only:
        parser.error(f"--seeds: must be at least 1, got {args.seeds}")
    if not (args.bench_dir / "workload.py").is_file():
        parser.error(f"--bench-dir {args.bench_dir}: no workload.py there (the shared benchmark workload)")
    sys.path.insert(0, str(args.bench_dir))
    import workload as W

    failed, code = 0, code_digest()
    for seed in [] if args.collect_only else [W.SEED + i for i in range(args.seeds)]:
        for algo in algos:
            for side in sides:
                folder = args.runs / algo / side / str(seed)
                if (done := finished(folder)) is not None and of_this_code(done, side, code):
                    continue
                print(f"{algo} seed {seed}: {side} ...", flush=True)
                shutil.rmtree(folder, ignore_errors=True)  # an interrupted run's leftovers
                folder.parent.mkdir(parents=True, exist_ok=True)
                result = run_one(command(side, algo, seed, args.bench_dir, args.trl_venv), folder,
                                 folder.parent / f"{seed}.log")
                if "failed" in result:
                    failed += 1
                    print(f"  FAILED: {result['failed']}", flush=True)
                    shutil.rmtree(folder, ignore_errors=True)  # not read as done, now or next time (the log stays)
    runs = collect(args.runs, algos, sides, code)
    if not any(by_seed for sides_ in runs.values() for by_seed in sides_.values()):
        print(f"error: no finished run of {', '.join(algos)} ({', '.join(sides)}) under {args.runs}", file=sys.stderr)
        return 1
    result = summary(runs)
    text = table(result)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"learning_vs_trl-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps({"last_k": LAST_K, "summary": result, "table": text,
                                "series": {a: {s: {seed: r["trends"] for seed, r in by_seed.items()}
                                               for s, by_seed in sides_.items()} for a, sides_ in runs.items()}},
                               indent=1))
    print(text)
    print(f"written {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
