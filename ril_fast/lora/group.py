"""LoRAGroupLinear: a frozen ``nn.Linear`` plus a growing group of LoRA adapters (docs/design.md §2).

``y = x W^T + b + Σ_{i≤t} s_i (x A_i^T) B_i^T``. Task t adds the pair (A_t, B_t = 0) and freezes the
earlier pairs, so only the newest pair trains. The EMA teacher is a copy of that pair only, held in
the buffers ``ema_a`` / ``ema_b``; it shares the frozen base and frozen adapters with the student.
The forward is one call of :func:`ril_fast.kernels.lora_group_linear`, so the fused kernel sees the
whole group at once; or, where merging is on (:attr:`LoRAGroupLinear.merge`), one plain linear with
the adapters folded into a cached weight (:meth:`LoRAGroupLinear.merged_weight`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from ril_fast import kernels
from ril_fast.kernels import reference

INITS = ("kaiming", "gaussian")

# Bumped after every optimizer step of any optimizer (a global torch hook): bitsandbytes' 8-bit
# optimizers and DeepSpeed's partitions write parameters without moving their version counters, so
# the merged-weight caches key on this as well.
_generation = [0]


def _optimizer_stepped(optimizer, args, kwargs) -> None:
    _generation[0] += 1


register_optimizer_step_post_hook(_optimizer_stepped)


def init_lora_a(rank: int, in_features: int, generator: torch.Generator | None, init: str,
                draw: bool = True) -> torch.Tensor:
    """A fresh (rank, in_features) fp32 A on the CPU, as PEFT draws it (B starts at zero)."""
    a = torch.empty(rank, in_features, dtype=torch.float32)
    if not draw:  # meta-device models (the memory planner) only need the shape
        return a
    if init == "kaiming":
        # PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> U(-1/sqrt(d_in), 1/sqrt(d_in)).
        bound = 1.0 / math.sqrt(in_features)
        return a.uniform_(-bound, bound, generator=generator)
    return a.normal_(0.0, 1.0 / rank, generator=generator)


def merges_by_default(device_type: str, dtype: torch.dtype, partitioned: bool = False) -> bool:
    """Whether a layer folds its adapters into cached weights when ``merge`` is None: where it was
    measured to pay, fp32 weights on the CPU (docs/kernels.md). Not under ZeRO-3, which partitions W
    (a merged copy would be the whole matrix on every rank). The memory planner asks the same question
    for the device it plans."""
    return device_type == "cpu" and dtype == torch.float32 and not partitioned


class LoRAGroupLinear(nn.Module):
    """A frozen linear layer with a group of LoRA adapters, one per task.

    Args:
        base: the ``nn.Linear`` to wrap; its parameters are frozen.
        dtype: dtype of the adapters and of the EMA copy (default float32).
        name: the module path of ``base`` in its model (used for export keys and checkpoints).

    Attributes:
        lora_a: ``nn.ParameterList`` of (r_i, d_in) tensors, one per task.
        lora_b: ``nn.ParameterList`` of (d_out, r_i) tensors, one per task.
        scales: list of floats ``alpha_i / r_i``.
        ema_a, ema_b: buffers with the EMA copy of the newest pair (None before the first task).
        use_teacher: when True the newest pair is replaced by (ema_a, ema_b) in the forward.
        active_tasks: None (all adapters) or n: only the first n adapters are used (0 = base model).
        merge: fold adapters into cached weights (None: where measured to pay, fp32 weights on CPU;
            True / False force it). Without grad (the sampler's prefix, the teacher, evaluation) the
            forward is then one linear with ``W + Σ s_i B_i A_i``, whatever the group size; with
            grad, the same weight is built under autograd from the cached fold of the frozen
            adapters. Each cached weight costs one copy of ``W``; both follow every in-place update.
    """

    merge: bool | None = None  # class-wide default; a layer may set its own

    def __init__(self, base: nn.Linear, dtype: torch.dtype = torch.float32, name: str = ""):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRAGroupLinear wraps an nn.Linear, got {type(base).__name__}; pass a Linear layer")
        self.base = base
        self.base.requires_grad_(False)
        self.adapter_dtype = dtype
        self.name = name
        self.lora_a = nn.ParameterList()
        self.lora_b = nn.ParameterList()
        self.scales: list[float] = []
        self.register_buffer("ema_a", None)
        self.register_buffer("ema_b", None)
        self._use_teacher = False
        self._active_tasks: int | None = None
        self._plan = None  # what the forward reads, built once per change of the group (:meth:`_build_plan`)
        self._folded = None  # (key, weight): W with the frozen adapters folded in (the grad path)
        self._merged = None  # (key, weight): W with every active adapter folded in (no grad)
        # ZeRO-3 gathers only a module's direct parameters before its forward; the forward here reads
        # base.weight and the adapters without calling those submodules, so mark it a leaf (DeepSpeed's
        # deepspeed.utils.z3_leaf_module reads this flag and then gathers recursively).
        self._z3_leaf = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        # diffusers reads `.weight.dtype` / `.weight.device` of some projections; expose the base's.
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def num_tasks(self) -> int:
        return len(self.lora_a)

    @property
    def active_tasks(self) -> int | None:
        return self._active_tasks

    @active_tasks.setter
    def active_tasks(self, n: int | None) -> None:
        if n is not None and not (isinstance(n, int) and 0 <= n <= self.num_tasks):
            raise ValueError(
                f"active_tasks={n!r} but this layer has {self.num_tasks} adapters; "
                f"use None (all) or 0..{self.num_tasks}"
            )
        self._active_tasks = n
        self._plan = None

    @property
    def use_teacher(self) -> bool:
        return self._use_teacher

    @use_teacher.setter
    def use_teacher(self, flag: bool) -> None:
        self._use_teacher = bool(flag)
        self._plan = None

    def _apply(self, fn, *args, **kwargs):
        self._plan = self._folded = self._merged = None  # .to(), .float(), ...: new devices or dtypes
        return super()._apply(fn, *args, **kwargs)

    def add_task(self, rank: int, alpha: float, generator: torch.Generator | None = None, init: str = "kaiming"):
        """Add the adapter pair of a new task (A random, B = 0) and freeze every earlier pair.

        Args:
            rank: r of the new pair (> 0).
            alpha: LoRA alpha; the pair's scale is ``alpha / rank``.
            generator: CPU generator for A's init (A is drawn on CPU in fp32, so the init does not
                depend on the device or dtype).
            init: ``kaiming`` (PEFT's default: kaiming-uniform with a=√5) or ``gaussian`` (std 1/r, as PEFT).
        Returns:
            the new (A, B) parameters.
        Raises:
            ValueError: on a non-positive rank or an unknown init.
        """
        if not (isinstance(rank, int) and rank > 0):
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        for p in list(self.lora_a) + list(self.lora_b):
            p.requires_grad_(False)
        device = self.base.weight.device
        a = init_lora_a(rank, self.in_features, generator, init, draw=device.type != "meta")
        a = nn.Parameter(a.to(device=device, dtype=self.adapter_dtype))
        b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=self.adapter_dtype))
        self.lora_a.append(a)
        self.lora_b.append(b)
        self.scales.append(float(alpha) / rank)
        self.reset_ema()
        self._plan = None
        return a, b

    def trainable_pair(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The newest (A, B) pair, the only one that trains."""
        n = self.num_tasks
        if n == 0:
            raise RuntimeError("this LoRAGroupLinear has no adapters yet; call add_task first")
        # the lists' dicts, not ParameterList indexing (µs each; the EMA update calls this per layer per step)
        return self.lora_a._parameters[str(n - 1)], self.lora_b._parameters[str(n - 1)]

    def ema_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA teacher's copy (A_ema, B_ema) of the newest pair."""
        if self.ema_a is None:
            raise RuntimeError("this LoRAGroupLinear has no adapters yet; call add_task first")
        return self.ema_a, self.ema_b

    @torch.no_grad()
    def reset_ema(self) -> None:
        """Set the EMA copy to the current trainable pair."""
        a, b = self.trainable_pair()
        self.ema_a = a.detach().clone()
        self.ema_b = b.detach().clone()
        self._plan = None

    def adapters_for_forward(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        """The (lora_a, lora_b, scales) lists the forward passes to the kernel (fresh lists)."""
        lora_a, lora_b = self._current_plan()[:2]
        return list(lora_a), list(lora_b), self.scales[:len(lora_a)]

    def _current_plan(self) -> tuple:
        plan = self._plan
        if plan is None or plan[4] is not self.merge:
            plan = self._plan = self._build_plan()
        return plan

    def _build_plan(self) -> tuple:
        """(lora_a, lora_b, tensors, merging, merge setting): the adapters in use, every tensor a
        merged weight depends on, and whether this layer merges. Rebuilt after add_task, reset_ema, a teacher or
        active-count switch and .to(); the forward reads it instead of walking the ParameterLists
        (a few µs per adapter per call, at thousands of calls per step)."""
        n = self.num_tasks if self._active_tasks is None else self._active_tasks
        pa, pb = self.lora_a._parameters, self.lora_b._parameters
        lora_a = [pa[str(i)] for i in range(n)]
        lora_b = [pb[str(i)] for i in range(n)]
        if self._use_teacher and n == self.num_tasks and n > 0:
            lora_a[-1], lora_b[-1] = self.ema_a, self.ema_b
        w = self.base.weight
        merging = self.merge
        if merging is None:
            merging = merges_by_default(w.device.type, w.dtype, partitioned=hasattr(w, "ds_id"))
        return tuple(lora_a), tuple(lora_b), (w, *lora_a, *lora_b), merging, self.merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        lora_a, lora_b, tensors, merging, _ = self._current_plan()
        base = self.base
        if not lora_a:  # no adapter active (before task 1, or active_tasks=0): the plain base layer
            return F.linear(x, base.weight, base.bias)
        scales = self.scales[:len(lora_a)]
        if merging:
            if not torch.is_grad_enabled():
                return F.linear(x, self._merged_weight(lora_a, lora_b, scales, tensors), base.bias)
            # The gradient window: the same weight, built under autograd from the cached fold of the
            # frozen adapters, so the student's window, its prefix and an equal teacher compute the
            # same bits. The no-grad cache is dropped: its memory goes back for the backward.
            self._merged = None
            frozen, live = self._split(lora_a, lora_b)
            return F.linear(x, self._fold_into(self._fold(frozen, lora_a, lora_b, scales), live, lora_a, lora_b,
                                               scales), base.bias)
        return kernels.lora_group_linear(x, base.weight, base.bias, list(lora_a), list(lora_b), scales)

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward torch.compile traces: adapters read from the ParameterLists (so its guards are
        on their count, the active count and the teacher flag, not on cache objects) and the group
        as one stacked LoRA, which the compiler fuses."""
        n = self.num_tasks if self._active_tasks is None else self._active_tasks
        if n == 0:
            return F.linear(x, self.base.weight, self.base.bias)
        lora_a, lora_b = list(self.lora_a)[:n], list(self.lora_b)[:n]
        if self._use_teacher and n == self.num_tasks:
            lora_a[-1], lora_b[-1] = self.ema_a, self.ema_b
        return reference.lora_group_linear_stacked(x, self.base.weight, self.base.bias, lora_a, lora_b,
                                                   self.scales[:n])

    # ---------------------------------------------------------------------------------------------
    # merged weights

    @staticmethod
    def _key(tensors: tuple, *extra) -> tuple:
        """What a cached weight depends on: the tensors themselves (held, so a freed tensor's address
        is never mistaken for a new one), their in-place versions, and ``extra``."""
        return tensors, [t._version for t in tensors], extra

    @staticmethod
    def _valid(entry, key) -> bool:
        if entry is None:
            return False
        (tensors, versions, extra), (new_tensors, new_versions, new_extra) = entry[0], key
        return (versions == new_versions and extra == new_extra and len(tensors) == len(new_tensors)
                and all(a is b for a, b in zip(tensors, new_tensors)))

    def _split(self, lora_a, lora_b) -> tuple[list, list]:
        """(frozen, rest): indices of the adapters folded into the long-lived cache (no grad, not the
        EMA pair, which moves every step) and of the others."""
        frozen = [i for i, (a, b) in enumerate(zip(lora_a, lora_b))
                  if not (a.requires_grad or b.requires_grad) and a is not self.ema_a]
        return frozen, [i for i in range(len(lora_a)) if i not in frozen]

    @staticmethod
    def _fold_into(w: torch.Tensor, idx, lora_a, lora_b, scales) -> torch.Tensor:
        """``w + Σ_{i in idx} s_i B_i A_i`` as a new tensor in ``w``'s dtype (one GEMM: the adapters
        stacked into rank R, the scales folded into B); differentiable in the adapters."""
        if not idx:
            return w
        a = torch.cat([lora_a[i].to(w.dtype) for i in idx])
        b = torch.cat([lora_b[i].to(w.dtype) * scales[i] for i in idx], dim=1)
        return torch.addmm(w, b, a)

    def _fold(self, idx, lora_a, lora_b, scales) -> torch.Tensor:
        """W with the frozen adapters ``idx`` folded in, cached until one of them, W or a scale changes
        (a task's whole life: frozen adapters change only when a checkpoint is loaded)."""
        key = self._key((self.base.weight, *(lora_a[i] for i in idx), *(lora_b[i] for i in idx)),
                        tuple(scales[i] for i in idx))
        if not self._valid(self._folded, key):
            with torch.no_grad():
                self._folded = (key, self._fold_into(self.base.weight, idx, lora_a, lora_b, scales))
        return self._folded[1]

    def merged_weight(self) -> torch.Tensor:
        """``W + Σ s_i B_i A_i`` over the adapters the forward uses now (the no-grad forward's weight)."""
        lora_a, lora_b, tensors = self._current_plan()[:3]
        return self._merged_weight(lora_a, lora_b, self.scales[:len(lora_a)], tensors)

    def _merged_weight(self, lora_a, lora_b, scales, tensors) -> torch.Tensor:
        """Cached until an adapter, W, a scale, the teacher switch or the active count changes, or an
        optimizer steps. Built on the cached fold of the frozen adapters, so a training step costs
        one rank-r update of W here, however many adapters the group holds."""
        key = self._key(tensors, tuple(scales), _generation[0])
        if not self._valid(self._merged, key):
            frozen, rest = self._split(lora_a, lora_b)
            with torch.no_grad():
                self._merged = (key, self._fold_into(self._fold(frozen, lora_a, lora_b, scales), rest, lora_a,
                                                     lora_b, scales))
        return self._merged[1]

    def extra_repr(self) -> str:
        ranks = [a.shape[0] for a in self.lora_a]
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, scales={self.scales}"
