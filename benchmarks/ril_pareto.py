"""The Pareto benchmark of Reward Incremental Learning: retention of earlier tasks against plasticity on later
ones, every method swept over its knob, several seeds, two task sequences (conflicting and aligned).

Each run is the real CLI (``python -m ril_fast.train``) in its own output folder, so the numbers are what a
user gets; finished runs are reused, so an interrupted benchmark picks up where it stopped.

    python benchmarks/ril_pareto.py                      # both sequences, every method, 3 seeds, 2 jobs
    python benchmarks/ril_pareto.py --sequences aligned --methods rid baseline --seeds 0 1 2 3

Axes (``ril_fast.evaluate_metrics.pareto_point``, rewards divided by their std over the base model's eval
images): retention = mean over tasks j < n of (R[n][j] − R[j−1][j]) / scale_j, the gain over its pre-training
level that each earlier task keeps at the end; plasticity = mean over tasks j ≥ 2 of P_j / scale_j, what the
later tasks were still able to learn. A method that only learns less moves left along its front, not up.

Writes ``benchmarks/results/cpu/ril_pareto.json`` (every run, every front, the dominance check) and
``docs/ril_pareto.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ril_fast.evaluate_metrics import pareto_point  # noqa: E402

SEQUENCES = {"conflicting": "configs/tiny.json", "aligned": "configs/tiny_aligned.json"}

# method -> (knob label, [(knob value, --set overrides)]). The learning-rate knob applies to tasks 2..n
# (task 1 is trained alike by every method, so every front starts from the same model).
LATER_LR = [1e-3, 3e-4, 1e-4, 3e-5]
LAMBDA = [1.0, 4.0, 16.0, 64.0]
L2 = [10.0, 100.0, 1000.0, 10000.0]  # 0.1 and 1 left the baseline unchanged on the aligned sequence


def _later_lr(value: float, n_tasks: int) -> list[str]:
    return [f"tasks.{i}.lr={value}" for i in range(1, n_tasks)]


def knobs(method: str, n_tasks: int) -> tuple[str, list[tuple[float, list[str]]]]:
    if method in ("baseline", "group"):
        return "lr of tasks 2..n", [(v, _later_lr(v, n_tasks)) for v in LATER_LR]
    if method == "joint":  # the multi-task upper bound: one point, every task at the shared learning rate
        return "lr of tasks 2..n", [(LATER_LR[0], _later_lr(LATER_LR[0], n_tasks))]
    if method in ("distill", "rid", "lwf", "kl_base"):
        return "distill_weight λ", [(v, [f"method.distill_weight={v}"]) for v in LAMBDA]
    if method == "l2":
        return "l2_weight μ", [(v, [f"method.l2_weight={v}"]) for v in L2]
    if method == "independent":
        return "none", [(0.0, [])]
    raise ValueError(f"unknown method {method!r}")


METHODS = ["rid", "baseline", "lwf", "distill", "group", "kl_base", "l2", "joint", "independent"]


def finished(run_dir: Path) -> dict | None:
    results = run_dir / "results.json"
    if results.is_file():
        res = json.loads(results.read_text())
        if len(res.get("reward_matrix", [])) == len(res["config"]["tasks"]) + 1:
            return res
    return None


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``name=method:key=value,key=value`` -> (name, method, ["key=value", ...])."""
    name, _, rest = text.partition("=")
    method, _, sets = rest.partition(":")
    if not name or method not in METHODS:
        raise SystemExit(f"--variant {text!r}: expected NAME=METHOD:KEY=VALUE[,KEY=VALUE] with METHOD in {METHODS}")
    return name, method, [s for s in sets.split(",") if s]


def run_one(config: str, method: str, knob: float, sets: list[str], seed: int, out: Path, extra: list[str],
            aggregate_only: bool = False) -> dict | None:
    run_dir = out / f"{method}_{knob:g}_seed{seed}"
    results = run_dir / "results.json"
    res = finished(run_dir)
    if res is not None or aggregate_only:
        return res
    cmd = [sys.executable, "-m", "ril_fast.train", "--config", config,
           "--set", f"seed={seed}", "--set", f"output_dir={run_dir}", "--set", "overwrite=true"]
    for item in sets + extra:
        cmd += ["--set", item]
    log = out / f"{method}_{knob:g}_seed{seed}.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"{method} {knob:g} seed {seed} failed (exit {rc}); see {log}")
    return json.loads(results.read_text())


def summarize(res: dict) -> dict:
    point = pareto_point(res)
    N = res["normalized"]["reward_matrix"]  # N[0] = 0: gains over the base model in reward-scale units
    return {**point, "average_final_normalized": res["normalized"]["average_final_reward"],
            "first_task_kept": N[-1][0],  # task 1's gain at the end: the trade-off without later tasks' repairs
            "reward_matrix": res["reward_matrix"], "structure_to_base": res["structure"]["to_base"][-1],
            "wall_seconds": res["wall_seconds"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fronts(runs: list[dict]) -> dict:
    """Per sequence and method: one point per knob value, mean and seed std of both axes."""
    out: dict = {}
    for r in runs:
        key = out.setdefault(r["sequence"], {}).setdefault(r["method"], {}).setdefault(f"{r['knob']:g}", [])
        key.append(r)
    for seq in out.values():
        for method, by_knob in seq.items():
            points = []
            for knob, rs in by_knob.items():
                entry = {"knob": float(knob), "seeds": [r["seed"] for r in rs]}
                for axis in ("retention", "plasticity", "retention_ratio", "average_final_normalized",
                             "structure_to_base", "first_task_kept"):
                    m, s = mean_std([r[axis] for r in rs])
                    entry[axis], entry[f"{axis}_std"] = m, s
                points.append(entry)
            seq[method] = {"knob": runs and next(r["knob_name"] for r in runs if r["method"] == method),
                           "points": sorted(points, key=lambda p: p["plasticity"])}
    return out


def _interp(points: list[dict], x: float) -> float | None:
    """Retention of a front at plasticity x (piecewise linear between its points), None outside its range."""
    xs = [p["plasticity"] for p in points]
    for (x0, p0), (x1, p1) in zip(zip(xs, points), zip(xs[1:], points[1:])):
        if x0 <= x <= x1:
            w = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return p0["retention"] + w * (p1["retention"] - p0["retention"])
    return None


def dominance(front_a: dict, front_b: dict) -> list[dict]:
    """For each point of front a, front b's retention at the same plasticity (interpolated), the margin, and
    whether it exceeds the seed std of both (a point outside b's plasticity range is not compared)."""
    out = []
    for p in front_a["points"]:
        other = _interp(front_b["points"], p["plasticity"])
        if other is None:
            out.append({"knob": p["knob"], "plasticity": p["plasticity"], "compared": False})
            continue
        near = min(front_b["points"], key=lambda q: abs(q["plasticity"] - p["plasticity"]))
        margin = p["retention"] - other
        noise = max(p["retention_std"], near["retention_std"])
        out.append({"knob": p["knob"], "plasticity": p["plasticity"], "compared": True, "retention": p["retention"],
                    "other_retention": other, "margin": margin, "seed_std": noise, "beyond_std": abs(margin) > noise})
    return out


COLORS = {"baseline": "#1f77b4", "group": "#aec7e8", "distill": "#ff7f0e", "lwf": "#2ca02c", "rid": "#d62728",
          "l2": "#9467bd", "kl_base": "#8c564b", "joint": "#e377c2", "independent": "#7f7f7f"}
VARIANT_COLORS = ["#17becf", "#bcbd22", "#ff9896", "#c5b0d5", "#98df8a", "#c49c94"]


def _draw(ax, fr_seq: dict, methods: list[str], title: str, y: str = "retention") -> None:
    variants = iter(VARIANT_COLORS)
    for method in methods:
        front = fr_seq[method]
        pts = front["points"]
        xs = [p["plasticity"] for p in pts]
        ys = [p[y] for p in pts]
        color = COLORS.get(method) or next(variants)
        style = dict(lw=2.6, ms=7, zorder=3) if method == "rid" else dict(lw=1.3, ms=5, zorder=2)
        ax.errorbar(xs, ys, xerr=[p["plasticity_std"] for p in pts], yerr=[p[f"{y}_std"] for p in pts],
                    marker="o", capsize=2, elinewidth=0.6, color=color, label=f"{method} ({front['knob']})", **style)
        for p in pts:  # the knob value next to each point, so a front reads without the table
            ax.annotate(f"{p['knob']:g}", (p["plasticity"], p[y]), textcoords="offset points",
                        xytext=(3, 3), fontsize=6, color=color)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("plasticity: mean normalised gain of tasks 2..n while trained")
    ax.set_ylabel("retention: normalised gain tasks 1..n−1 keep at the end" if y == "retention"
                  else "normalised gain task 1 keeps at the end")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot(fr: dict, path: Path) -> None:
    """Per sequence: every method's front, RID's variants against baseline and LwF, and task 1's kept gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = list(fr)
    fig, axes = plt.subplots(len(seqs), 3, figsize=(19.5, 5.2 * len(seqs)), squeeze=False)
    for row, seq in zip(axes, seqs):
        methods = [m for m in COLORS if m in fr[seq]]
        variants = [m for m in ("baseline", "lwf", "rid") if m in fr[seq]]
        variants += sorted(m for m in fr[seq] if m not in COLORS)
        _draw(row[0], fr[seq], methods, f"{seq} sequence: every method (mean ± seed std, knob value at each point)")
        _draw(row[1], fr[seq], variants, f"{seq} sequence: RID variants against baseline and LwF")
        _draw(row[2], fr[seq], methods, f"{seq} sequence: task 1 alone (no later task can repair it)",
              y="first_task_kept")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(fr: dict) -> str:
    lines = []
    for seq, methods in fr.items():
        lines += [f"\n**{seq}** (`{SEQUENCES[seq]}`)\n", "| method | knob | retention | plasticity | retention ratio "
                  "| avg final (norm.) | structure kept |", "|---|---|---|---|---|---|---|"]
        for method, front in sorted(methods.items()):
            for p in sorted(front["points"], key=lambda q: q["knob"]):
                lines.append(f"| {method} | {front['knob']} = {p['knob']:g} | {p['retention']:.2f} ± "
                             f"{p['retention_std']:.2f} | {p['plasticity']:.2f} ± {p['plasticity_std']:.2f} | "
                             f"{p['retention_ratio']:.2f} | {p['average_final_normalized']:.2f} | "
                             f"{p['structure_to_base']:.3f} |")
    return "\n".join(lines)


def compact_table(fr: dict, seq: str) -> str:
    """One row per method, one cell per knob value: retention / plasticity (mean ± seed std)."""
    lines = ["| method (knob) | knob: retention / plasticity (± seed std) |", "|---|---|"]
    order = [m for m in COLORS if m in fr[seq]] + sorted(m for m in fr[seq] if m not in COLORS)
    most = max(len(p["seeds"]) for m in order for p in fr[seq][m]["points"])
    for method in order:
        front = fr[seq][method]
        cells = [f"{p['knob']:g}: {p['retention']:.2f}±{p['retention_std']:.2f} / {p['plasticity']:.2f}±"
                 f"{p['plasticity_std']:.2f}" + (f" ({len(p['seeds'])} seeds)" if len(p["seeds"]) < most else "")
                 for p in sorted(front["points"], key=lambda q: q["knob"])]
        lines.append(f"| {method} ({front['knob']}) | " + "; ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", nargs="+", default=list(SEQUENCES), choices=list(SEQUENCES))
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:KEY=VALUE[,KEY=VALUE]",
                        help="also sweep METHOD's knob with these --set values, under NAME (e.g. "
                             "rid_frozen=rid:method.ema_decay=1.0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/pareto")
    parser.add_argument("--set", action="append", default=[], help="extra --set for every run")
    parser.add_argument("--json", default="benchmarks/results/cpu/ril_pareto.json")
    parser.add_argument("--plot", default="docs/ril_pareto.png")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="train nothing: aggregate the runs already finished under --out (a partial sweep)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    jobs = []
    for seq in args.sequences:
        config = SEQUENCES[seq]
        n_tasks = len(json.loads((ROOT / config).read_text())["tasks"])
        for method, base, extra in [(m, m, []) for m in args.methods] + [parse_variant(v) for v in args.variant]:
            knob_name, values = knobs(base, n_tasks)
            for knob, sets in values:
                for seed in args.seeds:
                    jobs.append((seq, config, method, knob_name, knob, [f"method.name={base}", *extra, *sets], seed))

    t0 = time.time()
    done = 0

    def work(job):
        nonlocal done
        seq, config, method, knob_name, knob, sets, seed = job
        res = run_one(config, method, knob, sets, seed, out / seq, args.set, args.aggregate_only)
        if res is None:
            return None
        done += 1
        print(f"[{done}/{len(jobs)}] {seq} {method} {knob_name}={knob:g} seed {seed}: {time.time() - t0:.0f} s",
              flush=True)
        return {"sequence": seq, "method": method, "knob_name": knob_name, "knob": knob, "seed": seed,
                **summarize(res)}

    with ThreadPoolExecutor(args.jobs) as pool:
        runs = [r for r in pool.map(work, jobs) if r is not None]
    fr = fronts(runs)
    checks = {}
    for seq, methods in fr.items():
        for ours in sorted(m for m in methods if m.startswith("rid")):  # rid and its variants
            for rival in ("baseline", "lwf"):
                if rival in methods:
                    checks[f"{seq}: {ours} vs {rival}"] = dominance(methods[ours], methods[rival])
    result = {"command": " ".join(["python", "benchmarks/ril_pareto.py", *sys.argv[1:]]), "seeds": args.seeds,
              "sequences": {s: SEQUENCES[s] for s in args.sequences}, "wall_seconds": time.time() - t0,
              "jobs": args.jobs, "runs_finished": len(runs), "runs_planned": len(jobs),
              "run_wall_seconds_sum": sum(r["wall_seconds"] for r in runs), "axes": {"retention": "mean_{j<n} (R[n][j] − R[j−1][j]) / scale_j",
                                          "plasticity": "mean_{j≥2} P_j / scale_j",
                                          "scale": "std of the task's reward over the base model's eval images"},
              "fronts": fr, "rid_dominance": checks, "runs": runs, "table_markdown": table(fr),
              "compact_tables": {seq: compact_table(fr, seq) for seq in fr}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    plot(fr, ROOT / args.plot)
    print(result["table_markdown"])
    for name, rows in checks.items():
        compared = [r for r in rows if r["compared"]]
        wins = sum(r["margin"] > 0 and r["beyond_std"] for r in compared)
        print(f"{name}: ahead beyond seed std at {wins} of {len(compared)} comparable points")
    print(f"wall time {result['wall_seconds']:.0f} s with {args.jobs} jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
