"""The Pareto benchmark's bookkeeping (benchmarks/ril_pareto.py): fronts, the dominance check at matched
plasticity, the variant syntax and the aggregate of finished runs, against hand-computed values."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from ril_fast.evaluate_metrics import ril_metrics

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ril_pareto", ROOT / "benchmarks" / "ril_pareto.py")
ril_pareto = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ril_pareto)


def front(points):
    return {"knob": "k", "points": [{"knob": k, "plasticity": x, "retention": y, "retention_std": s}
                                    for k, x, y, s in points]}


def test_dominance_interpolates_the_rival_at_matched_plasticity():
    ours = front([(1, 0.10, 0.30, 0.01), (2, 0.40, 0.20, 0.05), (3, 0.9, 0.5, 0.0)])
    rival = front([(1, 0.0, 0.20, 0.02), (2, 0.20, 0.10, 0.02), (3, 0.50, 0.10, 0.01)])
    rows = ril_pareto.dominance(ours, rival)
    # plasticity 0.10 is halfway from (0.0, 0.20) to (0.20, 0.10): the rival keeps 0.15
    assert rows[0]["compared"] and rows[0]["other_retention"] == pytest.approx(0.15)
    assert rows[0]["margin"] == pytest.approx(0.15) and rows[0]["beyond_std"]  # 0.15 > max(0.01, 0.02)
    # at 0.40 the rival keeps 0.10; margin 0.10 is beyond the larger std of the two nearest points
    assert rows[1]["margin"] == pytest.approx(0.10) and rows[1]["seed_std"] == pytest.approx(0.05)
    assert rows[1]["beyond_std"]
    assert not rows[2]["compared"]  # 0.9 is outside the rival's plasticity range: no extrapolation


def test_margin_inside_the_seed_std_is_not_a_win():
    rows = ril_pareto.dominance(front([(1, 0.1, 0.31, 0.05)]), front([(1, 0.0, 0.3, 0.05), (2, 0.2, 0.3, 0.05)]))
    assert rows[0]["margin"] == pytest.approx(0.01) and not rows[0]["beyond_std"]


def test_variant_syntax():
    assert ril_pareto.parse_variant("rid_fast=rid:method.ema_decay=0.9,method.distill_on=renoised") == (
        "rid_fast", "rid", ["method.ema_decay=0.9", "method.distill_on=renoised"])
    with pytest.raises(SystemExit):
        ril_pareto.parse_variant("x=nomethod:a=1")


def _result(R, base_std):
    """A results.json as the trainer writes it: ril_metrics keys merged in, plus the bits summarize reads."""
    names = ["a", "b", "c"]
    metrics = ril_metrics(R, names, base_std)
    return {**metrics, "reward_matrix": R, "config": {"tasks": [{}, {}, {}]},
            "structure": {"to_base": [1.0, 0.9, 0.8, 0.7]}, "wall_seconds": 5.0}


def test_aggregate_of_finished_runs(tmp_path):
    """Two seeds of one point: the summary axes by hand, their mean and std; an unfinished run is left out."""
    R0 = [[0, 0, 0], [2, -1, 0], [1, 1, 0], [1, 2, 3]]
    R1 = [[0, 0, 0], [2, -1, 0], [2, 1, 0], [2, 1, 2]]
    scales = [2.0, 1.0, 1.0]
    # seed 0: normalised N = R / scale; retention = mean(N[3][0] − N[0][0], N[3][1] − N[1][1])
    #       = mean(0.5, 3) = 1.75; plasticity = mean(P_2, P_3) = mean(2, 3) = 2.5; task 1 kept 0.5
    # seed 1: retention = mean(1, 2) = 1.5; plasticity = mean(2, 2) = 2; task 1 kept 1
    for seed, R in ((0, R0), (1, R1)):
        d = tmp_path / "seq" / f"rid_4_seed{seed}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(_result(R, scales)))
    partial = tmp_path / "seq" / "rid_4_seed2"
    partial.mkdir()
    (partial / "results.json").write_text(json.dumps({**_result(R0, scales), "reward_matrix": R0[:2]}))
    runs = []
    for seed in (0, 1, 2):
        res = ril_pareto.run_one("unused.json", "rid", 4.0, [], seed, tmp_path / "seq", [], aggregate_only=True)
        if res is not None:
            runs.append({"sequence": "s", "method": "rid", "knob_name": "λ", "knob": 4.0, "seed": seed,
                         **ril_pareto.summarize(res)})
    assert [r["seed"] for r in runs] == [0, 1]
    assert [r["retention"] for r in runs] == pytest.approx([1.75, 1.5])
    assert [r["plasticity"] for r in runs] == pytest.approx([2.5, 2.0])
    assert [r["first_task_kept"] for r in runs] == pytest.approx([0.5, 1.0])
    (point,) = ril_pareto.fronts(runs)["s"]["rid"]["points"]
    assert point["seeds"] == [0, 1] and point["retention"] == pytest.approx(1.625)
    assert point["retention_std"] == pytest.approx(math.sqrt(2) * 0.125)  # sample std of two values
