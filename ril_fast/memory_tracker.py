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
        self._meta_cache = MetaKernelCache()
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
        kwargs = kwargs or {}
        out = self._meta_cache.run(func, args, kwargs) if self.count_meta else func(*args, **kwargs)
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


class MetaKernelCache:
    """Output shapes of meta kernels, remembered per (op, argument shapes/strides/dtypes, other arguments).

    Many meta kernels are Python reference implementations (elementwise broadcasting, layer and group
    norm, ...) costing far more than the bookkeeping around them, and a UNet repeats the same few
    hundred calls thousands of times. Only ops whose outputs are fresh tensors are remembered (no
    views, no in-place or out= writes): for those a new empty meta tensor of the remembered shape,
    strides and dtype is exactly what the kernel would return.
    """

    def __init__(self):
        self._outputs: dict = {}
        self._fresh: dict = {}  # op -> whether its outputs are fresh tensors

    def run(self, func, args, kwargs):
        if not self._returns_fresh(func):
            return func(*args, **kwargs)
        try:
            key = (func, _key(args), _key(kwargs))
            hash(key)
        except TypeError:  # an argument that cannot be a key (e.g. a generator): just run it
            return func(*args, **kwargs)
        spec = self._outputs.get(key)
        if spec is None:
            out = func(*args, **kwargs)
            spec = _spec(out)
            if spec is not _UNCACHEABLE:
                self._outputs[key] = spec
            return out
        return _build(spec)

    def _returns_fresh(self, func) -> bool:
        fresh = self._fresh.get(func)
        if fresh is None:
            schema = getattr(func, "_schema", None)
            fresh = schema is not None and not any(a.alias_info is not None for a in schema.arguments) and \
                not any(r.alias_info is not None for r in schema.returns) and not schema.is_mutable and \
                all(str(r.type) in ("Tensor", "Tensor?", "Tensor[]") for r in schema.returns) and \
                func.namespace in ("aten", "prims")
            self._fresh[func] = fresh
        return fresh


_UNCACHEABLE = object()


def _key(obj):
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":  # a real tensor's values may matter (indices, scalars): no key
            raise TypeError("real tensor")
        return ("T", tuple(obj.shape), obj.stride(), obj.storage_offset(), obj.dtype, obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, *(_key(o) for o in obj))
    if isinstance(obj, dict):
        return tuple(sorted((k, _key(v)) for k, v in obj.items()))
    if isinstance(obj, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                        torch.memory_format)):
        return (type(obj).__name__, obj)
    raise TypeError(type(obj).__name__)


def _spec(out):
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        if out.device.type != "meta":
            return _UNCACHEABLE
        return (tuple(out.shape), out.stride(), out.dtype)
    if isinstance(out, (list, tuple)):
        parts = [_spec(o) for o in out]
        return _UNCACHEABLE if any(p is _UNCACHEABLE for p in parts) else (type(out), parts)
    return _UNCACHEABLE


def _build(spec):
    if spec is None:
        return None
    if isinstance(spec[0], type):
        kind, parts = spec
        return kind([_build(p) for p in parts])
    shape, stride, dtype = spec
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


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
