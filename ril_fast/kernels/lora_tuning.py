"""Per-GPU tuning table of the LoRA group linear: the fastest implementation per layer shape.

The op has more than one implementation of each direction:

- forward: ``fused`` (Triton, shrink in the base GEMM's K-loop), ``split`` (Triton, S first, LoRA
  in the base GEMM's epilogue) or ``cublas`` (cuBLAS base GEMM with the bias, cuBLAS shrink, then
  ``y += S·(B_cat·diag(scale))ᵀ`` as one cuBLAS ``addmm_`` reading y once);
- backward: ``triton`` (dS and dB from one read of dY, dX with the LoRA term in the GEMM epilogue,
  dA split-K), ``fused`` (dS, dB and dX in one persistent TMA kernel, one read of dY; then dA),
  ``fused_da`` (the same kernel reducing dA in its epilogue too: one launch) or
  ``cublas`` (the same products as cuBLAS GEMMs with fp32 dA/dB output). All compute dA/dB for the
  trainable slice only.

Which wins depends on the GPU and the shape (the Triton GEMMs use fixed tiles, so the tile config
is part of the choice). ``benchmarks/tune_lora.py`` times every candidate under CUDA-graph replay
on a GPU and writes a table; this module reads it. Lookup order: ``RIL_FAST_LORA_TUNING`` (a file,
or ``off``), the user cache ``~/.cache/ril_fast/lora_tuning/<gpu>.json``, the tables shipped in
``ril_fast/kernels/tuned/``. Shapes without an entry use the op's untuned defaults
(:func:`ril_fast.kernels.lora_group.forward_plan`, :func:`~ril_fast.kernels.lora_group.backward_plan`).

Table format (JSON)::

    {"gpu": "NVIDIA H100 80GB HBM3", "torch": ..., "triton": ...,
     "entries": {"bf16:8192:320:320:16": {"fwd": "fused", "fwd_cfg": [128, 64, 64, 8, 4, 4],
                                          "bwd": "cublas", "bwd_cfg": null}, ...}}

Keys are ``dtype:M-bucket:d_in:d_out:R-bucket`` (buckets: next power of two, R at least 16);
``*_cfg`` is the Triton tile config (BM, BN, BK, GROUP_M, warps, stages) of the main GEMM, with an
optional 7th entry naming its kernel: 0 the pointer kernel (the default), 1 or 2 the persistent TMA
kernel of :mod:`ril_fast.kernels.lora_tma` (2: C stored in two half-width slices).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

ENV = "RIL_FAST_LORA_TUNING"
SHIPPED = Path(__file__).resolve().parent / "tuned"
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ril_fast" / "lora_tuning"
FWD_IMPLS = ("cublas", "split", "fused")
BWD_IMPLS = ("cublas", "triton", "fused", "fused_da")
VARIANTS = (0, 1, 2)  # main-GEMM kernel: pointer, TMA persistent, TMA persistent with split stores (lora_tma)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

_tables: dict[str, dict | None] = {}  # gpu slug -> entries (None: no table)
_plans: dict[tuple, dict | None] = {}  # (slug, dtype, M, d_in, d_out, R) -> entry


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _bucket(n: int, lo: int = 16) -> int:
    n = max(int(n), lo)
    return 1 << (n - 1).bit_length()


def shape_key(dtype: torch.dtype, m: int, d_in: int, d_out: int, r: int) -> str:
    return f"{_DTYPES.get(dtype, str(dtype))}:{_bucket(m)}:{d_in}:{d_out}:{_bucket(r)}"


def table_path(slug: str) -> Path | None:
    """The table file for GPU ``slug`` (see the module docstring for the order), or None."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() == "off":
        return None
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ValueError(f"{ENV}={env!r} is not a file; point it at a table written by "
                             "benchmarks/tune_lora.py, or set it to 'off'")
        return path
    for folder in (USER_CACHE, SHIPPED):
        path = folder / f"{slug}.json"
        if path.is_file():
            return path
    return None


def validate(table: dict, source: str) -> dict:
    """The table's entries, checked; ValueError naming the first bad field otherwise."""
    entries = table.get("entries") if isinstance(table, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"LoRA tuning table {source}: no 'entries' object; regenerate it with benchmarks/tune_lora.py")
    for key, e in entries.items():
        where = f"LoRA tuning table {source}, entry {key!r}"
        if not isinstance(e, dict) or e.get("fwd") not in FWD_IMPLS or e.get("bwd") not in BWD_IMPLS:
            raise ValueError(f"{where}: needs fwd in {FWD_IMPLS} and bwd in {BWD_IMPLS}")
        for field in ("fwd_cfg", "bwd_cfg"):
            cfg = e.get(field)
            ok = isinstance(cfg, list) and len(cfg) in (6, 7) and all(isinstance(v, int) for v in cfg)
            if cfg is not None and not (ok and (len(cfg) == 6 or cfg[6] in VARIANTS)):
                raise ValueError(f"{where}: {field} must be null or 6 ints (BM, BN, BK, GROUP_M, warps, stages) "
                                 f"and optionally a 7th, the kernel variant in {VARIANTS}")
        if e["fwd"] == "fused" and int(key.rsplit(":", 1)[-1]) > 64:
            raise ValueError(f"{where}: the fused forward holds S in registers and takes R <= 64")
    return entries


def _entries(slug: str) -> dict | None:
    if slug not in _tables:
        path = table_path(slug)
        _tables[slug] = None if path is None else validate(json.loads(path.read_text()), str(path))
    return _tables[slug]


def clear() -> None:
    """Forget loaded tables and cached plans (after writing a table, or changing the env)."""
    _tables.clear()
    _plans.clear()


def plan(device: torch.device, dtype: torch.dtype, m: int, d_in: int, d_out: int, r: int) -> dict | None:
    """The table entry for this shape on ``device``'s GPU, or None (no table, no entry, not CUDA)."""
    if device.type != "cuda":
        return None
    key = (device.index, dtype, m, d_in, d_out, r)
    if key not in _plans:
        slug = gpu_slug(torch.cuda.get_device_name(device))
        entries = _entries(slug) or {}
        _plans[key] = entries.get(shape_key(dtype, m, d_in, d_out, r))
    return _plans[key]
