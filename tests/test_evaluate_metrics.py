"""Continual-learning metrics against hand-computed matrices and a loop oracle; SSIM and its structure term
against independent implementations."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ril_fast.evaluate_metrics import pareto_point, ril_metrics, ssim, structure_similarity

NAMES = ["contrast", "adherence", "jpeg"]

# Rows: base, after t1, after t2, after t3. Column 1's max is the base row (5), which is before task 1
# was trained: it must not count as forgetting. Task 1's gain is negative (5 -> 3) yet its column stays.
R_BASE_MAX = [
    [5.0, 1.0, 0.0],
    [3.0, 4.0, 0.0],
    [2.0, 6.0, 1.0],
    [1.0, 5.0, 8.0],
]
SCALES_BASE_MAX = [4.0, 0.5, 0.25]


def _assert_same(got, want, path="metrics"):
    """Exact key sets and list lengths, None where None, floats to 1e-12."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{path}[{i}]")
    elif want is None or isinstance(want, str):
        assert got == want, f"{path}: {got!r} != {want!r}"
    else:
        assert type(got) is float, f"{path}: {got!r} is not a plain float"
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12), f"{path}: {got!r} != {want!r}"


def test_ril_metrics_hand_computed():
    m = ril_metrics(R_BASE_MAX, NAMES, SCALES_BASE_MAX)
    old = NAMES[:-1]
    # Normalised matrix: (R − base row) / (4, 0.5, 0.25), the gain over the base model in scale units.
    N = [[0.0, 0.0, 0.0], [-0.5, 6.0, 0.0], [-0.75, 10.0, 4.0], [-1.0, 8.0, 32.0]]
    want = {
        "tasks": NAMES,
        "reward_scales": {"tasks": NAMES, "values": [4.0, 0.5, 0.25]},
        # P = (3 − 5, 6 − 4, 8 − 1)
        "plasticity": {"tasks": NAMES, "per_task": [-2.0, 2.0, 7.0], "mean": 7 / 3},
        # F1 = max(R[1][1], R[2][1]) − R[3][1] = max(3, 2) − 1 = 2 (the base row's 5 is excluded);
        # F2 = R[2][2] − R[3][2] = 6 − 5 = 1. Normalised: 2 / 4, 1 / 0.5.
        "forgetting": {
            "tasks": old,
            "per_task": [2.0, 1.0],
            "normalized_per_task": [0.5, 2.0],
            "mean": 1.5,
            "normalized_mean": 1.25,
        },
        # Task 1 learned nothing (P1 = −2): undefined. Task 2: (R[3][2] − R[1][2]) / P2 = (5 − 4) / 2.
        "retention": {"tasks": old, "per_task": [None, 0.5], "mean": 0.5},
        "bwt": ((1 - 3) + (5 - 6)) / 2,
        "average_final_reward": (1 + 5 + 8) / 3,
        "normalized": {
            "reward_matrix": N,
            "plasticity": {"tasks": NAMES, "per_task": [-0.5, 4.0, 28.0], "mean": 31.5 / 3},
            "forgetting": {"tasks": old, "per_task": [0.5, 2.0], "mean": 1.25},
            "bwt": ((-1.0 - -0.5) + (8 - 10)) / 2,
            "average_final_reward": (-1.0 + 8 + 32) / 3,
        },
    }
    _assert_same(m, want)
    json.dumps(m, allow_nan=False)
    # Task 1's negative gain is kept: retained gain (0.25 − 1.25) = −1 and (10 − 8) = 2.
    _assert_same(
        pareto_point(m),
        {"retention": 0.5, "plasticity": 16.0, "retained_gain": 0.5, "retention_ratio": 0.5, "later_plasticity": 16.0},
    )


def test_forgetting_starts_after_the_task_was_learned():
    # Task 1's best row is the base (9); it was learned 1 -> 4 and is still 4 at the end: no forgetting.
    # Task 2's best row is row 1 (7), before task 2 was trained; it ends where it was learned: none either.
    R = [
        [9.0, 0.0, 0.0],
        [1.0, 7.0, 0.0],
        [4.0, 2.0, 0.0],
        [4.0, 2.0, 3.0],
    ]
    m = ril_metrics(R, NAMES, [1.0, 1.0, 1.0])
    assert m["forgetting"]["per_task"] == [0.0, 0.0]
    # A dip after learning does count: peak 5 at row 2, then 2 at the end.
    R[2][0], R[3][0] = 5.0, 2.0
    assert ril_metrics(R, NAMES, [1.0, 1.0, 1.0])["forgetting"]["per_task"] == [3.0, 0.0]
    # Ending above every row since it was learned is negative forgetting (the final row is not in the max).
    R[3][0] = 6.0
    assert ril_metrics(R, NAMES, [1.0, 1.0, 1.0])["forgetting"]["per_task"] == [5.0 - 6.0, 0.0]


# Learns every task (and forgets a little of task 1) against one frozen after task 1.
R_LEARNER = [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [2.0, 1.0, 0.0], [1.5, 1.0, 3.0]]
R_FROZEN = [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]
SCALES = [2.0, 0.5, 1.0]


def test_frozen_after_task_one_is_not_perfect():
    frozen, learner = ril_metrics(R_FROZEN, NAMES, SCALES), ril_metrics(R_LEARNER, NAMES, SCALES)
    # On the forgetting-style metrics the frozen model looks perfect ...
    assert frozen["forgetting"]["per_task"] == [0.0, 0.0] and frozen["bwt"] == 0.0
    assert frozen["retention"]["per_task"] == [1.0, None]  # P2 = 0: nothing to retain
    assert frozen["retention"]["mean"] == 1.0 > learner["retention"]["mean"] == (0.75 + 1.0) / 2
    assert learner["forgetting"]["per_task"] == [0.5, 0.0]
    # ... but not on what it learned: normalised P = (1, 0, 0) against (1, 2, 3).
    assert frozen["normalized"]["plasticity"]["per_task"] == [1.0, 0.0, 0.0]
    assert learner["normalized"]["plasticity"]["per_task"] == [1.0, 2.0, 3.0]
    assert frozen["normalized"]["average_final_reward"] == pytest.approx(1 / 3)
    assert learner["normalized"]["average_final_reward"] == pytest.approx((0.75 + 2 + 3) / 3)
    pf, pl = pareto_point(frozen), pareto_point(learner)
    assert pf == {"retention": 0.5, "plasticity": 0.0, "retained_gain": 0.5, "retention_ratio": 1.0,
                  "later_plasticity": 0.0}
    assert pl == {"retention": 1.375, "plasticity": 2.5, "retained_gain": 1.375, "retention_ratio": 0.875,
                  "later_plasticity": 2.5}
    # On the Pareto axes the learner dominates the frozen model.
    assert pl["retention"] > pf["retention"] and pl["plasticity"] > pf["plasticity"]


def test_single_task():
    m = ril_metrics([[1.0], [3.0]], ["only"], [2.0])
    want_empty = {"tasks": [], "per_task": [], "mean": None}
    _assert_same(
        m,
        {
            "tasks": ["only"],
            "reward_scales": {"tasks": ["only"], "values": [2.0]},
            "plasticity": {"tasks": ["only"], "per_task": [2.0], "mean": 2.0},
            "forgetting": {**want_empty, "normalized_per_task": [], "normalized_mean": None},
            "retention": want_empty,
            "bwt": None,
            "average_final_reward": 3.0,
            "normalized": {
                "reward_matrix": [[0.0], [1.0]],
                "plasticity": {"tasks": ["only"], "per_task": [1.0], "mean": 1.0},
                "forgetting": want_empty,
                "bwt": None,
                "average_final_reward": 1.0,
            },
        },
    )
    assert pareto_point(m) == dict.fromkeys(
        ["retention", "plasticity", "retained_gain", "retention_ratio", "later_plasticity"], None
    )


def test_ratio_explodes_where_retained_gain_does_not():
    # Task 1 barely learned (P1 = 0.01) and drifts +0.5 later: ratio 51, retained gain 0.51 scales.
    R = [[0.0, 0.0], [0.01, 0.0], [0.51, 1.0]]
    p = pareto_point(ril_metrics(R, NAMES[:2], [1.0, 1.0]))
    assert p["retention_ratio"] == pytest.approx(51.0)
    assert p["retained_gain"] == pytest.approx(0.51)


def test_pareto_point_survives_json():
    m = ril_metrics(R_BASE_MAX, NAMES, SCALES_BASE_MAX)
    assert pareto_point(json.loads(json.dumps(m))) == pareto_point(m)


@pytest.mark.parametrize(
    "R, names, scales, match",
    [
        ([[1.0, 2.0], [3.0, 4.0]], NAMES[:2], [1, 1], r"expected \(n\+1, n\)"),
        ([[1.0], [2.0], [3.0]], ["a"], [1], r"expected \(n\+1, n\)"),
        ([1.0, 2.0], ["a"], [1], r"expected \(n\+1, n\)"),
        ([[1.0, 2.0], [3.0]], ["a"], [1], "rectangular"),
        ([[1.0], [float("nan")]], ["a"], [1], r"non-finite entry at \[1, 0\]"),
        ([[float("inf")], [1.0]], ["a"], [1], r"non-finite entry at \[0, 0\]"),
        ([[1.0], [2.0]], ["a", "b"], [1], "task_names must be 1 strings"),
        ([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], ["a"], [1, 1], "task_names must be 2 strings"),
        ([[1.0], [2.0]], [3], [1], "task_names must be 1 strings"),
        ([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], ["a", "a"], [1, 1], "distinct"),
        ([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], ["a", "b"], [1], r"reward_scales must be 2 numbers"),
        ([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], ["a", "b"], [1, 0.0], r"reward scale of 'b' is 0.0; .* > 0"),
        ([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], ["a", "b"], [-1, 1], r"reward scale of 'a' is -1.0"),
        ([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], ["a", "b"], [1, float("nan")], "reward scale of 'b' is nan"),
        ([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], ["a", "b"], [float("inf"), 1], "reward scale of 'a' is inf"),
        ([[1.0], [2.0]], ["a"], ["x"], "reward_scales must be 1 numbers"),
        ([[1.0], [2.0]], ["a"], [1e-320], "overflowed float64"),
    ],
    ids=["square", "too-many-rows", "1d", "ragged", "nan", "inf", "too-many-names", "too-few-names",
         "name-not-str", "duplicate-names", "scales-count", "scale-zero", "scale-negative", "scale-nan",
         "scale-inf", "scale-not-number", "scale-underflow"],
)
def test_ril_metrics_rejects_bad_inputs(R, names, scales, match):
    with pytest.raises(ValueError, match=match):
        ril_metrics(R, names, scales)


def _oracle(R, scales):
    """The DESIGN.md §3 formulas transcribed with 1-based tasks, as plain loops over lists."""
    n = len(R[0])

    def r(i, j, norm=False):  # R[i][j], task j 1-based; normalised: the gain over the base row in scale units
        return (R[i][j - 1] - R[0][j - 1]) / scales[j - 1] if norm else R[i][j - 1]

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    P = [r(j, j) - r(j - 1, j) for j in range(1, n + 1)]
    out = {"P": P, "F": [], "Fn": [], "ret": [], "bwt": [], "bwtn": [], "gain_n": []}
    for j in range(1, n):
        for key, norm in (("F", False), ("Fn", True)):
            best = r(j, j, norm)
            for l in range(j + 1, n):
                best = max(best, r(l, j, norm))
            out[key].append(best - r(n, j, norm))
        out["ret"].append((r(n, j) - r(j - 1, j)) / P[j - 1] if P[j - 1] > 0 else None)
        out["bwt"].append(r(n, j) - r(j, j))
        out["bwtn"].append(r(n, j, True) - r(j, j, True))
        out["gain_n"].append(r(n, j, True) - r(j - 1, j, True))
    out["Pn_later"] = [P[j - 1] / scales[j - 1] for j in range(2, n + 1)]
    out["avg"] = mean([r(n, j) for j in range(1, n + 1)])
    out["avg_n"] = mean([r(n, j, True) for j in range(1, n + 1)])
    out["ret_mean"] = mean([v for v in out["ret"] if v is not None])
    for k in ("bwt", "bwtn", "gain_n", "Pn_later"):
        out[k] = mean(out[k])
    return out


@st.composite
def _runs(draw):
    n = draw(st.integers(1, 5))
    value = st.integers(-100_000, 100_000).map(lambda k: k / 1000)  # measured rewards: no subnormal P_j
    R = [[draw(value) for _ in range(n)] for _ in range(n + 1)]
    if draw(st.booleans()):  # plateaus: ties in the max and P_j = 0
        R = [[round(v / 50) for v in row] for row in R]
    scales = [draw(st.floats(1e-3, 1e3)) for _ in range(n)]
    return R, scales


def _approx(got, want):
    if want is None or got is None:
        return got is want
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=300, deadline=None)
@given(_runs())
def test_ril_metrics_match_loop_oracle(run):
    R, scales = run
    names = [f"t{i}" for i in range(len(scales))]
    m, o = ril_metrics(R, names, scales), _oracle(R, scales)
    p = pareto_point(m)
    pairs = [
        *zip(m["plasticity"]["per_task"], o["P"]),
        *zip(m["forgetting"]["per_task"], o["F"]),
        *zip(m["forgetting"]["normalized_per_task"], o["Fn"]),
        *zip(m["retention"]["per_task"], o["ret"]),
        (m["bwt"], o["bwt"]),
        (m["normalized"]["bwt"], o["bwtn"]),
        (m["average_final_reward"], o["avg"]),
        (m["normalized"]["average_final_reward"], o["avg_n"]),
        (p["retained_gain"], o["gain_n"]),
        (p["retention_ratio"], o["ret_mean"]),
        (p["later_plasticity"], o["Pn_later"]),
    ]
    assert len(pairs) == 4 * len(scales) - 3 + 7
    for got, want in pairs:
        assert _approx(got, want), (got, want)
    json.dumps(m, allow_nan=False)


# ----------------------------------------------------------------------------------------------- SSIM


def _ssim_scipy(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM of one (C, H, W) pair written from Wang et al. 2004 eq. 13 with scipy, valid-region mean."""
    from scipy.ndimage import correlate1d

    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    g /= g.sum()

    def filt(z):  # separable Gaussian, keeping only positions where the window fits entirely
        z = correlate1d(correlate1d(z, g, axis=-1, mode="constant"), g, axis=-2, mode="constant")
        return z[..., 5:-5, 5:-5]

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(m.mean())


def _pair(shape=(3, 3, 20, 27), noise=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = (a + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def test_ssim_matches_scipy_formula():
    a, b = _pair()
    got = ssim(a, b)
    want = [_ssim_scipy(a[i].numpy(), b[i].numpy()) for i in range(a.shape[0])]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image not installed; scipy parity still runs")
    a, b = _pair(shape=(2, 3, 32, 24), seed=1)
    got = ssim(a, b)
    want = [
        metrics.structural_similarity(
            a[i].numpy(),
            b[i].numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=0,
        )
        for i in range(a.shape[0])
    ]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_ssim_analytic_properties():
    a, b = _pair()
    np.testing.assert_allclose(ssim(a, a).numpy(), 1.0, atol=1e-12)
    torch.testing.assert_close(ssim(a, b), ssim(b, a))
    vals = [ssim(*_pair(noise=s, seed=3)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert vals[0] > vals[1] > vals[2]
    assert all(-1.0 <= v < 1.0 for v in vals)
    # SSIM is invariant to the value range when data_range scales with it.
    torch.testing.assert_close(ssim(255 * a, 255 * b, data_range=255.0), ssim(a, b))
    # Per-image: a batch equals single runs.
    torch.testing.assert_close(ssim(a, b)[1:2], ssim(a[1:2], b[1:2]))


def test_ssim_fp32_close_to_fp64():
    a, b = _pair()
    out = ssim(a.float(), b.float())
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out.double(), ssim(a, b), atol=1e-5, rtol=0)
    assert ssim(a.half(), b.half()).dtype == torch.float32


def test_ssim_rejects_bad_inputs():
    a, b = _pair()
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, b[:, :, :-1])
    with pytest.raises(ValueError, match="same shape"):
        ssim(a[0], b[0])
    with pytest.raises(ValueError, match="must be ≥ 11"):
        ssim(a[..., :10], b[..., :10])
    with pytest.raises(ValueError, match="data_range"):
        ssim(a, b, data_range=0.0)


def test_ssim_values_are_finite_on_flat_images():
    z = torch.zeros(1, 3, 16, 16)
    assert ssim(z, z).item() == pytest.approx(1.0)
    assert math.isfinite(ssim(z, torch.ones_like(z)).item())


# ----------------------------------------------------------------------------------- structure term

C3 = 0.03**2 / 2  # Wang et al. 2004: C3 = C2 / 2, C2 = (K2 · data_range)²


def _structure_loop(x: np.ndarray, y: np.ndarray, c3: float = C3) -> tuple[np.ndarray, np.ndarray]:
    """Per-window structure term of one (3, H, W) RGB pair, one 11×11 window at a time (no convolution).

    Returns the structure map and the map of σ_x σ_y, both (H − 10, W − 10).
    """
    lx = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    ly = 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]
    r = np.arange(-5, 6)
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    H, W = lx.shape
    s, d = np.empty((H - 10, W - 10)), np.empty((H - 10, W - 10))
    for i in range(H - 10):
        for j in range(W - 10):
            px, py = lx[i : i + 11, j : j + 11], ly[i : i + 11, j : j + 11]
            dx, dy = px - (w * px).sum(), py - (w * py).sum()  # two-pass moments
            sx, sy, sxy = np.sqrt((w * dx * dx).sum()), np.sqrt((w * dy * dy).sum()), (w * dx * dy).sum()
            s[i, j], d[i, j] = (sxy + c3) / (sx * sy + c3), sx * sy
    return s, d


def _scene(seed: int = 0, H: int = 32, W: int = 32) -> torch.Tensor:
    """(1, 3, H, W) fp64 image in [0.25, 0.75]: gratings, a disc and pixel texture (structure at every scale)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    shared = 0.6 * ((x - 12) ** 2 + (y - H / 2) ** 2 < 40).double() + torch.rand(H, W, generator=g, dtype=torch.float64)
    chans = []
    for _ in range(3):
        f = torch.rand(3, generator=g, dtype=torch.float64)
        chans.append(shared + 0.5 * torch.sin(x * (0.3 + 0.5 * f[0]) + y * (0.2 + 0.4 * f[1]) + 6 * f[2]))
    img = torch.stack(chans)[None]
    return 0.25 + 0.5 * (img - img.min()) / (img.max() - img.min())


def _blur(img: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    k = torch.exp(-((torch.arange(9, dtype=torch.float64) - 4) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    z = torch.nn.functional.pad(img, (4, 4, 4, 4), mode="replicate")
    z = torch.nn.functional.conv2d(z, k.view(1, 1, 1, 9).expand(3, 1, 1, 9), groups=3)
    return torch.nn.functional.conv2d(z, k.view(1, 1, 9, 1).expand(3, 1, 9, 1), groups=3)


def test_structure_similarity_matches_window_loop():
    a, b = _pair(shape=(2, 3, 20, 23), seed=4)
    a[1] = _scene(1, 20, 23)[0]
    b[1] = _blur(a[1:2])[0]
    got = structure_similarity(a, b)
    want = [_structure_loop(a[i].numpy(), b[i].numpy())[0].mean() for i in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    # One-channel input is luma already.
    luma = lambda t: (0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2])[:, None]  # noqa: E731
    torch.testing.assert_close(structure_similarity(luma(a), luma(b)), got, rtol=1e-12, atol=1e-12)


def test_structure_similarity_ignores_gain_and_offset():
    a = _scene()
    # Against itself after x -> 0.5 x + 0.2: σ_ab = 0.5 σ_a² = σ_a σ_b in every window, so s = 1 whatever
    # C3 (measured |s − 1| = 4e-16); plain SSIM drops to 0.814 (its luminance and contrast terms).
    assert structure_similarity(a, 0.5 * a + 0.2).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, 0.5 * a + 0.2).item() < 0.85
    # Against another image b, b -> g b + o (g > 0) acts only through C3: each window's
    # (g σ_ab + C3) / (g σ_a σ_b + C3) is s(a, b) computed with C3 / g. Checked exactly against the loop.
    a, b = _pair(shape=(1, 3, 20, 23), seed=5)
    g = 0.5
    got = structure_similarity(a, g * b + 0.2).item()
    x, y = a[0].numpy(), b[0].numpy()
    s_c3, d = _structure_loop(x, y)
    assert got == pytest.approx(_structure_loop(x, y, c3=C3 / g)[0].mean(), rel=1e-10)
    # So per window s_g − s_1 = C3 (g − 1)(σ_ab − σ_a σ_b) / ((g σ_a σ_b + C3)(σ_a σ_b + C3)), and
    # |·| ≤ 2 C3 |1 − g| σ_a σ_b / ((g σ_a σ_b + C3)(σ_a σ_b + C3)) as |σ_ab| ≤ σ_a σ_b: small where the local std
    # is well above √C3 = 0.021 (here median σ_a σ_b = 0.038): bound 0.024, measured change 0.0014.
    bound = (2 * C3 * abs(1 - g) * d / ((g * d + C3) * (d + C3))).mean()
    assert 0 < abs(got - s_c3.mean()) < bound < 0.03


def test_structure_similarity_separates_edits_from_broken_structure():
    a = _scene()
    stretched = 2 * (a - 0.5) + 0.5  # contrast ×2, exactly fills [0, 1]: no clipping
    shuffled = a.flatten(2)[..., torch.randperm(32 * 32, generator=torch.Generator().manual_seed(1))].view_as(a)
    shifted = torch.roll(a, shifts=(3, 3), dims=(2, 3))
    s = {k: structure_similarity(a, v).item() for k, v in
         [("stretched", stretched), ("shuffled", shuffled), ("blurred", _blur(a)), ("shifted", shifted)]}
    # Measured: stretched 1.000, blurred 0.713, shuffled 0.104, shifted −0.208.
    assert s["stretched"] == pytest.approx(1.0, abs=1e-12)
    assert s["blurred"] < s["stretched"] - 0.2
    assert s["shuffled"] < 0.2 and s["shifted"] < 0.2
    # Plain SSIM counts the kept edit as drift: stretched 0.795 (blurred 0.450).
    assert ssim(a, stretched).item() < 0.85


def test_structure_similarity_dtypes_and_flat_images():
    a, b = _pair()
    out = structure_similarity(a.float(), b.float())
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out.double(), structure_similarity(a, b), atol=1e-5, rtol=0)
    assert structure_similarity(a.half(), b.half()).dtype == torch.float32
    torch.testing.assert_close(structure_similarity(a, b), structure_similarity(b, a))
    # Flat windows give C3 / C3 = 1 (no structure to compare), finite. This is the term's blind spot: a
    # collapse to a flat image is a gain of 0, so report it next to plain SSIM.
    z = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    assert structure_similarity(z, z).item() == 1.0
    assert structure_similarity(a[:1, :, :16, :16], z).item() == pytest.approx(1.0)


def test_structure_similarity_rejects_bad_inputs():
    a, b = _pair()
    with pytest.raises(ValueError, match="same shape"):
        structure_similarity(a, b[:, :, :-1])
    with pytest.raises(ValueError, match="must be ≥ 11"):
        structure_similarity(a[..., :10], b[..., :10])
    with pytest.raises(ValueError, match="C = 2"):
        structure_similarity(a[:, :2], b[:, :2])
    with pytest.raises(ValueError, match="data_range"):
        structure_similarity(a, b, data_range=-1.0)
