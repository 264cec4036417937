"""Re-plan the steps a GPU measured and compare: measured ``max_memory_allocated`` / planned peak.

    python benchmarks/plan_vs_measured.py [--results benchmarks/results/nvidia-h100-80gb-hbm3] [--out FILE]

Reads every ``step_*.json`` written by ``bench_step.py`` on a GPU, plans the same config, overrides
and task with the current planner (CPU, fake tensors), and writes one row per step. Useful when
the planner changes and no GPU is at hand: the measured side of a step does not change with it.
Each row says which reward models the measured step held on the device, so the planned side is
traced with the same residency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ril_fast import memory
from ril_fast.config import load_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results/nvidia-h100-80gb-hbm3")
    ap.add_argument("--out", default=None, help="default: RESULTS/plan_vs_measured.json")
    args = ap.parse_args(argv)
    folder = Path(args.results)
    rows = []
    for path in sorted(folder.glob("step_*.json")):
        step = json.loads(path.read_text())
        if "max_memory_allocated_gib" not in step:
            continue
        overrides = list(step.get("overrides", []))
        # bench_step.py as measured held only the stepped task's reward tower on the GPU unless told
        # otherwise (its "idle_rewards" field, written since the switch existed)
        residency = step.get("idle_rewards", "cpu")
        cfg = load_config(step["config"], overrides + [f"memory.idle_rewards={residency}"])
        p = memory.plan(cfg, [step["task"] - 1], include_eval=False)
        rows.append({"file": path.name, "config": step["config"], "overrides": overrides, "task": step["task"],
                     "reward": step["reward"], "idle_rewards": residency, "device": step.get("device"),
                     "measured_gib": round(step["max_memory_allocated_gib"], 3),
                     "planned_gib": round(p.peak_gib, 3),
                     "measured_over_planned": round(step["max_memory_allocated_gib"] / p.peak_gib, 3),
                     "planned_breakdown": p.to_dict()["breakdown"]})
        print(f"{path.name:36s} task {step['task']} {step['reward']:12s} measured {rows[-1]['measured_gib']:7.3f} "
              f"planned {rows[-1]['planned_gib']:7.3f} ratio {rows[-1]['measured_over_planned']:.3f}", flush=True)
    out = Path(args.out) if args.out else folder / "plan_vs_measured.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows, "target": "measured within 10% of planned"}, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
