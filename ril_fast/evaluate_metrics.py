"""Metric maths for Reward Incremental Learning: continual-learning metrics and image-structure drift.

Pure functions, no I/O. The reward matrix follows DESIGN.md §3 (tasks are 1-based in the text):

    R has n + 1 rows and n columns. Row 0 is the base model; row i (1 ≤ i ≤ n) is the model after
    training task i. Column j − 1 (0-based) holds task j, so task j's column is ``c = j − 1`` and
    the row right after training it is ``c + 1``; the row before is ``c``.

Rewards differ in scale by 100×, so every cross-task figure is also given with each column divided
by a fixed, stated reward scale (e.g. the std of that reward over the base model's eval images).
No column is ever dropped: a task that was not learned still counts.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Wang et al. 2004 constants; skimage's `structural_similarity(gaussian_weights=True)` uses the same.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# ITU-R BT.601 luma weights (they sum to 1, so luma(g·x + o) = g·luma(x) + o).
LUMA_BT601 = (0.299, 0.587, 0.114)


def _as_matrix(R) -> np.ndarray:
    """Validate a reward matrix and return it as float64 (n+1, n)."""
    try:
        M = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward matrix must be a rectangular list of numbers; got {type(R).__name__} ({e})") from e
    if M.ndim != 2 or M.shape[1] < 1 or M.shape[0] != M.shape[1] + 1:
        raise ValueError(
            f"reward matrix has shape {M.shape}; expected (n+1, n) with n ≥ 1 "
            "(row 0 = base model, row i = after task i); pass one row per evaluation including the base row"
        )
    if not np.isfinite(M).all():
        bad = np.argwhere(~np.isfinite(M))[0].tolist()
        raise ValueError(f"reward matrix has a non-finite entry at {bad}; all entries must be finite; re-run that eval")
    return M


def _check_labels(task_names, reward_scales, n: int) -> tuple[list[str], np.ndarray]:
    names = list(task_names)
    if len(names) != n or not all(isinstance(t, str) for t in names):
        raise ValueError(f"task_names must be {n} strings, one per reward-matrix column; got {names!r}")
    if len(set(names)) != n:
        raise ValueError(f"task_names must be distinct (they label every list); got {names!r}")
    try:
        scales = np.asarray(reward_scales, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward_scales must be {n} numbers; got {reward_scales!r} ({e})") from e
    if scales.shape != (n,):
        raise ValueError(f"reward_scales must be {n} numbers, one per task; got shape {scales.shape}")
    bad = [(t, float(s)) for t, s in zip(names, scales) if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(
            f"reward scale of {bad[0][0]!r} is {bad[0][1]}; every scale must be finite and > 0 "
            "(e.g. the std of that reward over the base model's eval images)"
        )
    return names, scales


def _finite(x) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"a metric overflowed to {x}; rewards or 1/scale are too large for float64")
    return x


def _mean(values) -> float | None:
    """Mean of the entries that are not None; None if there are none."""
    vals = [v for v in values if v is not None]
    return _finite(np.mean(vals)) if vals else None


def _plain_metrics(M: np.ndarray) -> dict:
    """Plasticity, forgetting, BWT and average final reward of one (n+1, n) matrix (0-based, see module doc)."""
    n = M.shape[1]
    old = range(n - 1)  # tasks 1 … n−1: those a later task can have made the model forget
    plasticity = [_finite(M[c + 1, c] - M[c, c]) for c in range(n)]
    # F_j = max_{j ≤ l < n} R[l][j] − R[n][j]: rows c+1 … n−1, from just after the task was learned.
    forgetting = [_finite(M[c + 1 : n, c].max() - M[n, c]) for c in old]
    return {
        "plasticity": plasticity,
        "forgetting": forgetting,
        "bwt": _mean([M[n, c] - M[c + 1, c] for c in old]),
        "average_final_reward": _mean(M[n]),
    }


def ril_metrics(R, task_names, reward_scales) -> dict:
    """Continual-learning metrics of a reward-incremental run (DESIGN.md §3), raw and normalised.

    With n tasks, 1-based task j (column ``c = j − 1``) and the final row n:

    - plasticity ``P_j = R[j][j] − R[j−1][j]`` for every task (n values): what training task j bought;
    - forgetting ``F_j = max_{j ≤ l < n} R[l][j] − R[n][j]`` for j < n (n − 1 values): only rows from
      just after task j was learned, so damage done before it was trained is not forgetting of it;
    - retention ``(R[n][j] − R[j−1][j]) / P_j`` for j < n, None where ``P_j ≤ 0`` (nothing was learned,
      so "fraction kept" is undefined); its mean is over the defined entries. Scale-free already;
    - ``bwt = mean_{j<n} (R[n][j] − R[j][j])`` (None when n = 1); ``average_final_reward`` = mean of R[n].

    ``normalized`` repeats them on ``(R[:, c] − R[0][c]) / reward_scales[c]``, the gain over the base model in
    scale units, which keeps every column (its average final reward is the mean normalised gain).

    Args:
        R: reward matrix (n+1, n), list of lists or array; row 0 = base model.
        task_names: n distinct strings, one per column.
        reward_scales: n finite positive floats, the unit each task's reward is divided by.

    Returns:
        JSON-serialisable dict of plain floats, lists and None (no NaN); every list is labelled by
        the ``tasks`` next to it. Keys: ``tasks``, ``reward_scales``, ``plasticity``, ``forgetting``,
        ``retention``, ``bwt``, ``average_final_reward``, ``normalized``.

    Raises:
        ValueError: bad shape, non-finite entries, wrong number of names or scales, a scale ≤ 0.
    """
    M = _as_matrix(R)
    n = M.shape[1]
    names, scales = _check_labels(task_names, reward_scales, n)
    with np.errstate(over="ignore"):
        Mn = (M - M[0]) / scales
    if not np.isfinite(Mn).all():
        raise ValueError(f"reward matrix / reward_scales overflowed float64; a scale is too small: {scales.tolist()}")
    raw, norm = _plain_metrics(M), _plain_metrics(Mn)
    retention = [
        _finite((M[n, c] - M[c, c]) / raw["plasticity"][c]) if raw["plasticity"][c] > 0 else None
        for c in range(n - 1)
    ]
    return {
        "tasks": names,
        "reward_scales": {"tasks": names, "values": [float(s) for s in scales]},
        "plasticity": {"tasks": names, "per_task": raw["plasticity"], "mean": _mean(raw["plasticity"])},
        "forgetting": {
            "tasks": names[:-1],
            "per_task": raw["forgetting"],
            "normalized_per_task": norm["forgetting"],
            "mean": _mean(raw["forgetting"]),
            "normalized_mean": _mean(norm["forgetting"]),
        },
        "retention": {"tasks": names[:-1], "per_task": retention, "mean": _mean(retention)},
        "bwt": raw["bwt"],
        "average_final_reward": raw["average_final_reward"],
        "normalized": {
            "reward_matrix": [[_finite(v) for v in row] for row in Mn],
            "plasticity": {"tasks": names, "per_task": norm["plasticity"], "mean": _mean(norm["plasticity"])},
            "forgetting": {"tasks": names[:-1], "per_task": norm["forgetting"], "mean": _mean(norm["forgetting"])},
            "bwt": norm["bwt"],
            "average_final_reward": norm["average_final_reward"],
        },
    }


def pareto_point(metrics: dict) -> dict:
    """One method's point on the retention-vs-plasticity Pareto benchmark, from :func:`ril_metrics`.

    With normalised rewards ``N = (R − R[0]) / scale`` (``metrics["normalized"]["reward_matrix"]``):

    - ``retained_gain = mean_{j<n} (N[n][j] − N[j−1][j])``: how far above its pre-training level each
      earlier task ends, in reward-scale units. Defined for every task, even when ``P_j ≤ 0``.
    - ``retention_ratio`` = mean of the defined retention ratios ``(R[n][j] − R[j−1][j]) / P_j``.
    - ``later_plasticity = mean_{j≥2} P_j / scale_j``: what the later tasks were still able to learn.

    ``retention`` (the Pareto axis) is ``retained_gain`` and ``plasticity`` is ``later_plasticity``.
    The ratio is reported but not used as the axis: with a tiny ``P_j`` its denominator makes it
    explode (or flip sign), and a model that learns less of task 1 gets a flattering ratio for keeping
    that little. A model frozen after task 1 has ratio 1 and zero forgetting, but ``later_plasticity``
    0, so it sits at the left end of the front instead of at the top.

    Returns:
        dict with ``retention``, ``plasticity``, ``retained_gain``, ``retention_ratio`` and
        ``later_plasticity``; each is None when undefined (n = 1, or no ratio defined).
    """
    N = np.asarray(metrics["normalized"]["reward_matrix"], dtype=np.float64)
    n = N.shape[1]
    retained_gain = _mean([N[n, c] - N[c, c] for c in range(n - 1)])
    later_plasticity = _mean(metrics["normalized"]["plasticity"]["per_task"][1:])
    return {
        "retention": retained_gain,
        "plasticity": later_plasticity,
        "retained_gain": retained_gain,
        "retention_ratio": metrics["retention"]["mean"],
        "later_plasticity": later_plasticity,
    }


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _check_pair(fn: str, a: torch.Tensor, b: torch.Tensor, data_range: float) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"{fn} needs two (B, C, H, W) batches of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"{fn} images are {tuple(a.shape[-2:])}; H and W must be ≥ {SSIM_WINDOW} (the window size); "
            "upsample or evaluate at a larger resolution"
        )
    if not data_range > 0:
        raise ValueError(f"{fn} data_range is {data_range}; it must be > 0 (1.0 for images in [0, 1])")


def _local_moments(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gaussian-weighted local means, variances and covariance over valid 11×11 windows (population moments)."""
    C = a.shape[1]
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, a.dtype, a.device)
    gh = g.view(1, 1, 1, -1).expand(C, 1, 1, SSIM_WINDOW)  # separable: filter rows, then columns
    gv = g.view(1, 1, -1, 1).expand(C, 1, SSIM_WINDOW, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, gh, groups=C), gv, groups=C)  # (B, C, H-10, W-10)

    mu_a, mu_b = blur(a), blur(b)
    return mu_a, mu_b, blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b


def _promote(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype=dtype, device=a.device)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004) with an 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03.

    Local statistics use the normalised Gaussian window over valid positions only (no padding) and
    population (biased) moments; the SSIM map is averaged over channels and positions. This equals
    ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=0)`` per image.

    Args:
        a: images (B, C, H, W), values in [0, data_range]; H, W ≥ 11.
        b: images of the same shape.
        data_range: dynamic range of the values (1.0 for images in [0, 1]).

    Returns:
        (B,) float tensor on a's device, at least fp32 (fp64 stays fp64).

    Raises:
        ValueError: shapes differ, are not 4-D, are smaller than the window, or data_range ≤ 0.
    """
    _check_pair("ssim", a, b, data_range)
    a, b = _promote(a, b)
    mu_a, mu_b, var_a, var_b, cov = _local_moments(a, b)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return smap.mean(dim=(1, 2, 3))


def structure_similarity(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM *structure* term of the luma per image: drift that ignores global tone and contrast edits.

    Wang et al. 2004, eq. 9: ``s = (σ_ab + C3) / (σ_a σ_b + C3)`` with ``C3 = C2 / 2 = (K2 · data_range)² / 2``,
    on BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (one-channel input is taken as luma), with the
    same local statistics as :func:`ssim` (11×11 Gaussian, σ = 1.5, valid positions, population
    moments), averaged over positions. A global gain/offset ``g·b + o`` (g > 0) changes s only through
    C3 (the same s with C3 / g), and ``s(a, g·a + o) = 1`` exactly, so a kept contrast or brightness edit
    reads as no drift, while shuffled, shifted or blurred structure lowers it. Values lie in [−1, 1].
    The gain invariance is close only where the local std is well above √C3 ≈ 0.02 · data_range, and a
    flat window scores 1 (nothing to compare), so a collapse to a flat image is invisible here: report
    this next to :func:`ssim`, not instead of it.

    Args:
        a: images (B, C, H, W) with C = 3 (RGB) or 1 (luma), values in [0, data_range]; H, W ≥ 11.
        b: images of the same shape.
        data_range: dynamic range of the values (1.0 for images in [0, 1]).

    Returns:
        (B,) float tensor on a's device, at least fp32 (fp64 stays fp64).

    Raises:
        ValueError: shapes differ, are not 4-D, C is not 1 or 3, images are smaller than the window,
            or data_range ≤ 0.
    """
    _check_pair("structure_similarity", a, b, data_range)
    if a.shape[1] not in (1, 3):
        raise ValueError(f"structure_similarity needs RGB (C = 3) or luma (C = 1) images; got C = {a.shape[1]}")
    a, b = _promote(a, b)
    if a.shape[1] == 3:
        w = torch.tensor(LUMA_BT601, dtype=a.dtype, device=a.device).view(1, 3, 1, 1)
        a, b = (a * w).sum(1, keepdim=True), (b * w).sum(1, keepdim=True)
    _, _, var_a, var_b, cov = _local_moments(a, b)
    c3 = (SSIM_K2 * data_range) ** 2 / 2
    # Cancellation in E[x²] − μ² can leave a flat window's variance a hair below 0.
    smap = (cov + c3) / (var_a.clamp_min(0).sqrt() * var_b.clamp_min(0).sqrt() + c3)
    return smap.mean(dim=(1, 2, 3))
