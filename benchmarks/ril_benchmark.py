"""The offline RIL benchmark: every method × several seeds on one config, aggregated into one table.

Each run is the real CLI (``python -m ril_fast.train``) in its own output folder, so the numbers are
what a user gets; finished runs are reused (the trainer resumes), so an interrupted benchmark picks up
where it stopped.

    python benchmarks/ril_benchmark.py --config configs/tiny.json --seeds 0 1 2 \
        --methods baseline group distill rid --out runs/bench [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(config: str, method: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{method}_seed{seed}"
    cmd = [sys.executable, "-m", "ril_fast.train", "--config", config, "--set", f"method.name={method}",
           "--set", f"seed={seed}", "--set", f"output_dir={run_dir}"]
    for item in extra:
        cmd += ["--set", item]
    log = out / f"{method}_seed{seed}.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"{method} seed {seed} failed (exit {rc}); see {log}")
    return json.loads((run_dir / "results.json").read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(results: dict[str, list[dict]]) -> tuple[dict, str]:
    first = next(iter(results.values()))[0]
    tasks = first["tasks"]
    n = len(tasks)
    summary, lines = {}, []
    lines.append(f"Tasks: {' → '.join(tasks)}; {len(first['reward_matrix'])} rows (row 0 = base model).\n")
    header = "| method | " + " | ".join(f"final {t}" for t in tasks) + " | mean forgetting | mean norm. forgetting"
    has_adh = "prompt_adherence" in first
    header += " | adherence after each task (shape/colour)" if has_adh else ""
    header += " | SSIM to base (final) | wall s |"
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for method, runs in results.items():
        final = [[r["reward_matrix"][-1][j] for r in runs] for j in range(n)]
        forget = [r["forgetting"]["mean"] for r in runs if r["forgetting"] and r["forgetting"]["mean"] is not None]
        forget_n = [r["forgetting"]["mean_normalized"] for r in runs
                    if r["forgetting"] and r["forgetting"]["mean_normalized"] is not None]
        drift = [r["structure_drift"][-1] for r in runs]
        wall = [r["wall_seconds"] for r in runs]
        row = f"| {method} | " + " | ".join(fmt(v) for v in final)
        row += f" | {fmt(forget) if forget else '–'} | {fmt(forget_n) if forget_n else '–'}"
        entry = {"final_rewards": final, "forgetting_mean": forget, "forgetting_mean_normalized": forget_n,
                 "ssim_final": drift, "wall_seconds": wall,
                 "reward_matrix_mean": [[statistics.fmean(r["reward_matrix"][i][j] for r in runs) for j in range(n)]
                                        for i in range(n + 1)]}
        if has_adh:
            adh = []
            for i in range(n + 1):
                shape = [r["prompt_adherence"][i].get("shape", float("nan")) for r in runs]
                colour = [r["prompt_adherence"][i].get("colour", float("nan")) for r in runs]
                adh.append(f"{statistics.fmean(shape):.2f}/{statistics.fmean(colour):.2f}")
            entry["adherence"] = adh
            row += " | " + " → ".join(adh)
        row += f" | {fmt(drift)} | {statistics.fmean(wall):.0f} |"
        lines.append(row)
        summary[method] = entry
    lines.append("\nMean reward matrices (rows: base, after task 1..n; columns: tasks):\n")
    for method, entry in summary.items():
        lines.append(f"- **{method}**: " + "; ".join(
            "[" + ", ".join(f"{v:.3f}" for v in row) + "]" for row in entry["reward_matrix_mean"]))
    return summary, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.json")
    parser.add_argument("--methods", nargs="+", default=["baseline", "group", "distill", "rid"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/ril_benchmark")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--json", default="benchmarks/results/cpu/ril_tiny.json")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda ms: (ms, run_one(args.config, ms[0], ms[1], out, args.set)), jobs))
    results: dict[str, list[dict]] = {}
    for (method, _), res in done:
        results.setdefault(method, []).append(res)
    summary, table = aggregate(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"config": args.config, "seeds": args.seeds, "overrides": args.set,
                                           "methods": summary, "table_markdown": table}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
