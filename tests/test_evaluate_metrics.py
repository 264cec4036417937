"""Forgetting / transfer metrics against hand-computed matrices, and SSIM against independent implementations."""

import json
import math

import numpy as np
import pytest
import torch

from ril_fast.evaluate_metrics import forgetting, normalize_matrix, ssim, task_gains

# Rows: base, after t1, after t2, after t3. Column 0's best earlier value is the base row (5), and its
# gain is negative (training t1 lowered it: 5 -> 3), so its normalised forgetting is undefined.
R_BASE_MAX = [
    [5.0, 1.0, 0.0],
    [3.0, 4.0, 0.0],
    [2.0, 6.0, 1.0],
    [1.0, 5.0, 8.0],
]

# The final model is better on every old task than at any earlier point: negative forgetting.
R_NEGATIVE = [
    [0.0, 0.0, 0.0],
    [2.0, 0.0, 0.0],
    [1.0, 3.0, 0.0],
    [5.0, 4.0, 1.0],
]


def test_forgetting_max_is_base_row():
    f = forgetting(R_BASE_MAX)
    assert f["n_tasks"] == 3
    assert f["gain"] == [-2.0, 5.0, 8.0]
    assert f["per_task"] == [5 - 1, 6 - 5]
    assert f["per_task_argmax_row"] == [0, 2]
    assert f["per_task_normalized"][0] is None  # gain -2 ≤ 0
    assert f["per_task_normalized"][1] == pytest.approx(1 / 5)
    assert f["mean"] == pytest.approx(2.5)
    assert f["mean_normalized"] == pytest.approx(0.2)  # only the defined entry
    assert f["backward_transfer"] == pytest.approx(((1 - 3) + (5 - 6)) / 2)
    assert f["backward_transfer_normalized"] == pytest.approx(-1 / 5)
    assert f["forward_transfer"] == pytest.approx(((4 - 1) + (1 - 0)) / 2)
    assert f["average_reward"] == pytest.approx(14 / 3)
    assert f["average_reward_per_row"] == pytest.approx([2.0, 7 / 3, 3.0, 14 / 3])
    # final row normalised by gain: col0 undefined, col1 (5-1)/5, col2 (8-0)/8
    assert f["average_normalized_reward"] == pytest.approx((0.8 + 1.0) / 2)


def test_forgetting_negative():
    f = forgetting(R_NEGATIVE)
    assert f["per_task"] == [2 - 5, 3 - 4]
    assert f["per_task_normalized"] == pytest.approx([-3 / 2, -1 / 3])
    assert f["mean"] == pytest.approx(-2.0)
    assert f["backward_transfer"] == pytest.approx(((5 - 2) + (4 - 3)) / 2)


def test_forgetting_zero_gain_is_none():
    R = [[1.0, 2.0], [1.0, 2.0], [0.5, 3.0]]  # task 1 never improved
    f = forgetting(R)
    assert f["per_task"] == [0.5]
    assert f["per_task_normalized"] == [None]
    assert f["mean_normalized"] is None
    assert f["backward_transfer_normalized"] is None
    assert f["mean"] == pytest.approx(0.5)
    assert np.isnan(normalize_matrix(R)[:, 0]).all()
    json.dumps(f, allow_nan=False)


def test_forgetting_single_task():
    f = forgetting([[1.0], [3.0]])
    assert f["per_task"] == [] and f["per_task_normalized"] == []
    assert f["mean"] is None and f["mean_normalized"] is None
    assert f["backward_transfer"] is None and f["forward_transfer"] is None
    assert f["average_reward"] == 3.0
    assert f["average_normalized_reward"] == 1.0
    assert f["gain"] == [2.0]


def _forgetting_loops(R):
    """Independent oracle: the docs/design.md §3 formulas written as plain loops over a list of lists."""
    n = len(R[0])
    per, norm = [], []
    for j in range(n - 1):
        best = R[0][j]
        for l in range(1, n):
            best = max(best, R[l][j])
        per.append(best - R[n][j])
        gain = R[j + 1][j] - R[0][j]
        norm.append(per[-1] / gain if gain > 0 else None)
    bwt = [R[n][j] - R[j + 1][j] for j in range(n - 1)]
    return per, norm, (sum(bwt) / len(bwt) if bwt else None)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_forgetting_matches_loop_oracle(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        R = rng.normal(size=(n + 1, n)).round(3).tolist()
        f = forgetting(R)
        per, norm, bwt = _forgetting_loops(R)
        assert f["per_task"] == pytest.approx(per)
        for got, want in zip(f["per_task_normalized"], norm):
            assert (got is None) == (want is None) and (want is None or got == pytest.approx(want))
        assert f["backward_transfer"] == pytest.approx(bwt)


def test_normalized_metrics_are_scale_free():
    # Rewards differ in scale by 100×: an affine change of one column's units must not move normalised metrics.
    R = np.array(R_NEGATIVE)
    S = R.copy()
    S[:, 0] = 100.0 * S[:, 0] - 7.0
    S[:, 1] = 0.01 * S[:, 1] + 3.0
    a, b = forgetting(R), forgetting(S)
    assert a["per_task_normalized"] == pytest.approx(b["per_task_normalized"])
    assert a["average_normalized_reward"] == pytest.approx(b["average_normalized_reward"])
    assert a["backward_transfer_normalized"] == pytest.approx(b["backward_transfer_normalized"])
    assert a["per_task"] != pytest.approx(b["per_task"])  # raw figures do change
    np.testing.assert_allclose(normalize_matrix(R, "std"), normalize_matrix(S, "std"), atol=1e-12)


def test_normalize_matrix_values():
    R = np.array(R_NEGATIVE)
    g = normalize_matrix(R, "gain")
    np.testing.assert_allclose(g[:, 0], np.array([0, 2, 1, 5]) / 2)
    np.testing.assert_allclose(g[:, 1], np.array([0, 0, 3, 4]) / 3)
    np.testing.assert_allclose(g[:, 2], np.array([0, 0, 0, 1]) / 1)
    s = normalize_matrix(R, "std")
    np.testing.assert_allclose(s[:, 0], (R[:, 0] - 0) / np.std([0, 2, 1, 5]))
    np.testing.assert_allclose(task_gains(R), [2, 3, 1])
    with pytest.raises(ValueError, match="allowed: 'gain', 'std'"):
        normalize_matrix(R, "zscore")


@pytest.mark.parametrize(
    "R, match",
    [
        ([[1.0, 2.0], [3.0, 4.0]], r"expected \(n\+1, n\)"),
        ([[1.0], [2.0], [3.0]], r"expected \(n\+1, n\)"),
        ([1.0, 2.0], r"expected \(n\+1, n\)"),
        ([[1.0], [float("nan")]], "non-finite entry at \\[1, 0\\]"),
        ([[1.0, 2.0], [3.0]], "rectangular"),
    ],
    ids=["square", "too-many-rows", "1d", "nan", "ragged"],
)
def test_forgetting_rejects_bad_matrices(R, match):
    with pytest.raises(ValueError, match=match):
        forgetting(R)


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
