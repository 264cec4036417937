"""Metric math for Reward Incremental Learning: forgetting, transfer, normalisation and SSIM drift.

Pure functions, no I/O. The reward matrix follows docs/design.md §3:

    R has n + 1 rows and n columns. Row 0 is the base model; row i (1 ≤ i ≤ n) is the model after
    training the i-th task. Column j (0-based) is the (j+1)-th task, so the row right after that
    task was trained is row j + 1. ``R[i][j]`` is the mean held-out reward of column j's task.

Rewards differ in scale by 100×, so every cross-task mean is also given normalised by each
task's own gain (``R[j+1][j] − R[0][j]``); the raw cross-task means are kept for completeness.
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


def _float_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _mean_defined(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def task_gains(R) -> np.ndarray:
    """Gain each task achieved while it was trained: ``R[j+1][j] − R[0][j]``.

    Args:
        R: reward matrix (n+1, n).

    Returns:
        float64 array (n,).
    """
    M = _as_matrix(R)
    n = M.shape[1]
    return M[np.arange(1, n + 1), np.arange(n)] - M[0]


def normalize_matrix(R, method: str = "gain") -> np.ndarray:
    """Put every column of the reward matrix on a common, scale-free axis.

    Both methods subtract the base row, so row 0 becomes 0 in every column.

    - ``"gain"`` (default): divide column j by the gain ``R[j+1][j] − R[0][j]``, so 0 = base model and
      1 = the reward reached right after training that task. A column whose gain is ≤ 0 (the task was
      not learned) has no meaningful scale and becomes all NaN.
    - ``"std"``: divide column j by its population std over the n+1 rows. A constant column becomes NaN.

    Args:
        R: reward matrix (n+1, n).
        method: ``"gain"`` or ``"std"``.

    Returns:
        float64 array (n+1, n), NaN in undefined columns.

    Raises:
        ValueError: bad shape, non-finite entries or an unknown method.
    """
    M = _as_matrix(R)
    if method == "gain":
        scale = task_gains(M)
        ok = scale > 0
    elif method == "std":
        scale = M.std(axis=0)
        ok = scale > 0
    else:
        raise ValueError(f"normalize_matrix method {method!r} is unknown; allowed: 'gain', 'std'")
    out = np.full_like(M, np.nan)
    out[:, ok] = (M[:, ok] - M[0, ok]) / scale[ok]
    return out


def forgetting(R) -> dict:
    """Forgetting, average reward and transfer of a reward-incremental run (docs/design.md §3).

    Definitions, with n tasks, column j (0-based) trained in row j+1, and the final row n:

    - ``per_task[j] = max_{0 ≤ l ≤ n−1} R[l][j] − R[n][j]`` for j < n−1 (the last task cannot have been
      forgotten yet). The max includes the base row and the rows before the task was trained, so a
      task that ends below where the base model started counts as forgotten. Negative = the final
      model is better than at any earlier point.
    - ``per_task_normalized[j] = per_task[j] / gain[j]`` with ``gain[j] = R[j+1][j] − R[0][j]``;
      None when ``gain[j] ≤ 0`` (the task was never learned, so "fraction of the gain lost" is
      undefined). ``mean_normalized`` averages only the defined entries (None if there are none).
    - ``backward_transfer = mean_{j<n−1} (R[n][j] − R[j+1][j])`` (raw), and the same divided by the
      gain (``backward_transfer_normalized``, over columns with gain > 0).
    - ``forward_transfer = mean_{1 ≤ j ≤ n−1} (R[j][j] − R[0][j])``: how much training the earlier tasks
      moved task j before it was trained.
    - ``average_reward`` = mean of the last row, ``average_reward_per_row`` = row means. These mix raw
      scales; prefer ``average_normalized_reward`` (gain-normalised, see :func:`normalize_matrix`).

    With n = 1 nothing can be forgotten: ``per_task`` is empty and every forgetting/transfer mean is None.

    Args:
        R: reward matrix (n+1, n), list of lists or array.

    Returns:
        dict of plain floats, lists and None (JSON-serialisable).

    Raises:
        ValueError: R is not (n+1, n) or has non-finite entries.
    """
    M = _as_matrix(R)
    n = M.shape[1]
    gain = task_gains(M)
    old = range(n - 1)  # tasks that can have been forgotten

    per_task = [float(M[:n, j].max() - M[n, j]) for j in old]
    argmax_row = [int(M[:n, j].argmax()) for j in old]
    per_task_norm = [per_task[j] / gain[j] if gain[j] > 0 else None for j in old]
    bwt_raw = [float(M[n, j] - M[j + 1, j]) for j in old]
    bwt_norm = [bwt_raw[j] / gain[j] if gain[j] > 0 else None for j in old]
    fwt = [float(M[j, j] - M[0, j]) for j in range(1, n)]
    norm_last = normalize_matrix(M, "gain")[n]

    return {
        "n_tasks": n,
        "gain": [float(g) for g in gain],
        "per_task": per_task,
        "per_task_argmax_row": argmax_row,
        "per_task_normalized": [_float_or_none(v) for v in per_task_norm],
        "mean": _mean_defined(per_task),
        "mean_normalized": _mean_defined(per_task_norm),
        "average_reward": float(M[n].mean()),
        "average_reward_per_row": [float(v) for v in M.mean(axis=1)],
        "average_normalized_reward": _mean_defined(norm_last.tolist()),
        "backward_transfer": _mean_defined(bwt_raw),
        "backward_transfer_normalized": _mean_defined(bwt_norm),
        "forward_transfer": _mean_defined(fwt),
    }


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


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
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"ssim needs two (B, C, H, W) batches of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(
            f"ssim images are {tuple(a.shape[-2:])}; H and W must be ≥ {SSIM_WINDOW} (the window size); "
            "upsample or evaluate at a larger resolution"
        )
    if not data_range > 0:
        raise ValueError(f"ssim data_range is {data_range}; it must be > 0 (1.0 for images in [0, 1])")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dtype), b.to(dtype=dtype, device=a.device)
    C = a.shape[1]
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, dtype, a.device)
    gh = g.view(1, 1, 1, -1).expand(C, 1, 1, SSIM_WINDOW)  # separable: filter rows, then columns
    gv = g.view(1, 1, -1, 1).expand(C, 1, SSIM_WINDOW, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, gh, groups=C), gv, groups=C)  # (B, C, H-10, W-10)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return smap.mean(dim=(1, 2, 3))
