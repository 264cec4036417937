"""LoRAGroupLinear: a frozen ``nn.Linear`` plus a growing group of LoRA adapters (docs/design.md §2).

``y = x W^T + b + Σ_{i≤t} s_i (x A_i^T) B_i^T``. Task t adds the pair (A_t, B_t = 0) and freezes the
earlier pairs, so only the newest pair trains. The EMA teacher is a copy of that pair only, held in
the buffers ``ema_a`` / ``ema_b``; it shares the frozen base and frozen adapters with the student.
The forward is one call of :func:`ril_fast.kernels.lora_group_linear`, so the fused kernel sees the
whole group at once.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ril_fast import kernels

INITS = ("kaiming", "gaussian")


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
    """

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
        self.use_teacher = False
        self._active_tasks: int | None = None
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
        return a, b

    def trainable_pair(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The newest (A, B) pair, the only one that trains."""
        if self.num_tasks == 0:
            raise RuntimeError("this LoRAGroupLinear has no adapters yet; call add_task first")
        return self.lora_a[-1], self.lora_b[-1]

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

    def adapters_for_forward(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        """The (lora_a, lora_b, scales) lists the forward passes to the kernel."""
        n = self.num_tasks if self._active_tasks is None else self._active_tasks
        # Read the lists' parameter dicts: slicing a ParameterList builds a new Module, and indexing
        # it costs ~3 µs per item (per layer call: 27 of 165 µs host time at k = 4 on CPU).
        pa, pb = self.lora_a._parameters, self.lora_b._parameters
        lora_a = [pa[str(i)] for i in range(n)]
        lora_b = [pb[str(i)] for i in range(n)]
        if self.use_teacher and n == self.num_tasks and n > 0:
            lora_a[-1], lora_b[-1] = self.ema_a, self.ema_b
        return lora_a, lora_b, self.scales[:n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b, scales = self.adapters_for_forward()
        if not lora_a:  # no adapter active (before task 1, or active_tasks=0): the plain base layer
            return F.linear(x, self.base.weight, self.base.bias)
        return kernels.lora_group_linear(x, self.base.weight, self.base.bias, lora_a, lora_b, scales)

    def extra_repr(self) -> str:
        ranks = [a.shape[0] for a in self.lora_a]
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}, scales={self.scales}"
