"""Byte accounting for the memory planner: a dispatch mode that follows every storage's lifetime,
and the step that turns meta modules into tensors it counts (fresh meta tensors, or real ones).

Used by :mod:`ril_fast.memory`; kept apart so the planner module holds the planning logic only.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ---------------------------------------------------------------------------------------------
# Byte tracking


class MemoryTracker(TorchDispatchMode):
    """Live bytes of every tensor storage created inside the mode (meta or real), with a peak.

    Each new output storage is counted once under the current tag and uncounted by a weakref
    finalizer when the storage dies. ``peak_by_tag`` is the per-tag split at the moment of the peak.
    """

    def __init__(self, count_meta: bool = False):
        super().__init__()
        self.count_meta = count_meta  # a trace on meta tensors counts them; else they are weights not yet materialised
        self.live = 0
        self.peak = 0
        self.by_tag: dict[str, int] = defaultdict(int)
        self.peak_by_tag: dict[str, int] = {}
        self.tags = ["other"]
        self._seen: dict[int, tuple[int, str]] = {}

    def adopt(self, tensors, tag: str) -> None:
        """Count tensors that exist already (e.g. loaded weights), so views of them are not new."""
        self.push(tag)
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.pop()

    def push(self, tag: str) -> None:
        self.tags.append(tag)

    def pop(self) -> None:
        self.tags.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" and not self.count_meta:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        nbytes, tag = storage.nbytes(), self.tags[-1]
        self._seen[key] = (nbytes, tag)
        self.live += nbytes
        self.by_tag[tag] += nbytes
        weakref.finalize(storage, self._free, key)
        if self.live > self.peak:
            self.peak = self.live
            self.peak_by_tag = {k: v for k, v in self.by_tag.items() if v}

    def _free(self, key: int) -> None:
        nbytes, tag = self._seen.pop(key, (0, ""))
        self.live -= nbytes
        if tag:
            self.by_tag[tag] -= nbytes


def tag_module(module: nn.Module, tracker: MemoryTracker, tag: str) -> None:
    """Attribute allocations inside ``module``'s forward (and its checkpoint recompute) to ``tag``."""
    module.register_forward_pre_hook(lambda *_: tracker.push(tag))
    module.register_forward_hook(lambda *_: tracker.pop())


# ---------------------------------------------------------------------------------------------
# Materialising meta modules as fake (or real) tensors inside the tracker


def materialize(module: nn.Module, tracker: MemoryTracker, tag_of) -> None:
    """Replace every meta parameter/buffer of ``module`` by a fresh tensor of the same shape/dtype.

    ``tag_of(module, name, is_param)`` names the tracker tag. Called with meta as the default device
    the new tensors are meta: no memory is touched, but a ``count_meta`` tracker counts their bytes.
    """
    memo: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in memo:
                tracker.push(tag_of(mod, name, True))
                memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                tracker.pop()
            mod._parameters[name] = memo[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is None or b.device.type != "meta":
                continue
            if id(b) not in memo:
                tracker.push(tag_of(mod, name, False))
                memo[id(b)] = torch.zeros(b.shape, dtype=b.dtype)
                tracker.pop()
            mod._buffers[name] = memo[id(b)]
