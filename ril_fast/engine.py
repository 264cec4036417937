"""Training backends: DeepSpeed (under its launcher) or a plain single process; optimizers; precision.

Precision plan (one place): frozen base weights in ``model.dtype``; trainable adapters, the EMA
teacher and the optimizer state fp32 (or bitsandbytes 8-bit state); the VAE decodes in fp32.
The same under DeepSpeed: ``deepspeed.precision`` names ``model.dtype`` in DeepSpeed's words
(validation refuses a mismatch) and DeepSpeed's own bf16/fp16 modes are never switched on, since
they cast every parameter of the module they get to half precision (the trained adapters, whose
optimizer state and EMA are fp32, and the frozen adapters of earlier tasks, re-rounded at every
task's engine). DeepSpeed is given only the parameters being trained (:class:`TrainedParameters`),
so it cannot touch, move or broadcast the frozen model either.
A new :class:`Engine` (and so a new optimizer) is built at the start of every task.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Sequence

import torch

_log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# deepspeed.precision -> the model.dtype it stands for
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def launched_distributed() -> bool:
    """True under the deepspeed launcher or torchrun (they set WORLD_SIZE for every rank)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def use_deepspeed(cfg) -> bool:
    mode = cfg.deepspeed.enabled
    return mode == "on" or (mode == "auto" and launched_distributed())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_env() -> None:
    """DeepSpeed without its launcher needs the rendezvous variables a launcher would set."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_ranks() -> int:
    """Ranks of this run on this machine (torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit():
            return max(1, int(os.environ[key]))
    return 1


def cpu_threads(cfg) -> int | None:
    """torch CPU threads for this rank: ``train.cpu_threads`` if set; else, when several ranks of a run
    that computes on the CPU share this machine and OMP_NUM_THREADS is unset, its cores split between
    them (each rank taking every core made a tiny run 10x slower); else None (torch's default)."""
    if cfg.train.cpu_threads is not None:
        return cfg.train.cpu_threads
    on_cpu = cfg.model.device == "cpu" or (cfg.model.device == "auto" and not torch.cuda.is_available())
    if not on_cpu or local_ranks() == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, len(os.sched_getaffinity(0)) // local_ranks())


def dist_ready() -> bool:
    """True once a process group spans more than one rank (DeepSpeed initialises it with the first Engine)."""
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier_all() -> None:
    if dist_ready():
        torch.distributed.barrier()


def replica_fingerprints(params: Sequence[torch.Tensor]) -> list[int]:
    """One 60-bit hash of the exact bytes of ``params`` per rank (rank order); a single entry without ranks.

    Data-parallel replicas must hold bitwise-identical trainable weights after every step; differing
    fingerprints mean the ranks drifted apart (a missed all-reduce, rank-dependent code).
    """
    import hashlib

    flat = torch.cat([p.detach().float().flatten().cpu() for p in params]) if params else torch.zeros(0)
    mine = torch.tensor([int(hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:15], 16)], dtype=torch.int64)
    if not dist_ready():
        return [int(mine)]
    if torch.distributed.get_backend() == "nccl":  # nccl gathers device tensors only
        mine = mine.to(torch.device("cuda", torch.cuda.current_device()))
    gathered = [torch.zeros_like(mine) for _ in range(world_size())]
    torch.distributed.all_gather(gathered, mine)
    return [int(t) for t in gathered]


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (a collective: every rank must call it); ``[obj]`` alone."""
    if not dist_ready():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def mean_over_ranks(value: torch.Tensor) -> float:
    """Mean of a scalar over all ranks (a collective: every rank must call it), as a float for logging."""
    if dist_ready():
        value = value.detach().float().clone()
        if torch.distributed.get_backend() == "nccl":
            value = value.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(value)
        value = value / world_size()
    return float(value)


def device_type(cfg) -> str:
    """The type of device a run of ``cfg`` takes here (``model.device``, ``auto`` = cuda when there is
    one), without touching any device: the memory planner asks it too."""
    if cfg.model.device != "auto":
        return torch.device(cfg.model.device).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(cfg) -> torch.device:
    """The run's device; a GPU is also made the current device (``model.device: cuda:1`` included):
    Triton launches on the current device, whatever its arguments' (the fused ops also switch when
    called on another GPU, at a small host cost per call that this avoids)."""
    if cfg.model.device != "auto":
        device = torch.device(cfg.model.device)
    elif device_type(cfg) == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        return torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def make_optimizer(params: Sequence[torch.nn.Parameter], name: str, lr: float, weight_decay: float):
    if name == "adamw":
        # foreach: one multi-tensor op per update term instead of a Python loop over the ~100 adapter
        # tensors; torch picks it by default on CUDA only (on CPU it halves the step, 5.5 -> 2.7 ms)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer must be adamw or adamw8bit, got {name!r}")


def deepspeed_config(cfg) -> dict:
    ds = cfg.deepspeed
    out = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "steps_per_print": 10**9,  # our own logger prints
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        out["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        out["zero_force_ds_cpu_optimizer"] = False
    # No "bf16"/"fp16" section, whatever deepspeed.precision says: the frozen base is already in
    # model.dtype, and those modes would cast the fp32 adapters (see the module docstring).
    return out


class TrainedParameters(torch.nn.Module):
    """The module DeepSpeed is given: only the parameters being trained (the same Parameter objects
    the model's layers hold). DeepSpeed all-reduces, partitions and clips what it is given, and casts,
    moves and broadcasts every parameter of it; the frozen UNet and earlier adapters stay out of reach."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)


def _patch_shm_op() -> None:
    """Skip DeepSpeed's shared-memory comm op JIT build on CPU (~28 s); gloo works without it."""
    import importlib

    comm_torch = importlib.import_module("deepspeed.comm.torch")
    if hasattr(comm_torch, "build_shm_op"):
        comm_torch.build_shm_op = lambda *a, **k: None


def init_process_group(cfg) -> None:
    """Under a launcher with several ranks, join the process group now (DeepSpeed would at the first
    Engine), so the base-model evaluation and the first checkpoint already see every rank."""
    if not (use_deepspeed(cfg) and launched_distributed() and world_size() > 1):
        return
    import deepspeed

    if torch.cuda.is_available():  # NCCL collectives (all_gather_object, ...) use the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _patch_shm_op()
    deepspeed.init_distributed()


def _dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in module.named_parameters()}


class Engine:
    """Backward, clipping, the optimizer step and non-finite detection, for one task.

    Args:
        module: the module that owns the trainable parameters (the UNet).
        params: trainable parameters (the newest adapter pair).
        cfg: the run config; ``lr`` the task's learning rate.
        plain, optimizer: no DeepSpeed, and this optimizer, whatever the config says (the memory planner:
            neither DeepSpeed nor bitsandbytes' kernels run on meta tensors).
    """

    def __init__(self, module: torch.nn.Module, params: list[torch.nn.Parameter], cfg, lr: float, *,
                 plain: bool = False, optimizer: str | None = None):
        self.cfg = cfg
        self.params = params
        self.deepspeed = use_deepspeed(cfg) and not plain
        self.optimizer = make_optimizer(params, optimizer or cfg.train.optimizer, lr, cfg.train.weight_decay)
        self.ds_engine = None
        if self.deepspeed:
            import deepspeed

            if not launched_distributed():
                init_single_process_env()
            if not torch.cuda.is_available():
                _patch_shm_op()
            before = _dtypes(module)
            self.ds_engine, self.optimizer, _, _ = deepspeed.initialize(
                model=TrainedParameters(params), model_parameters=params, optimizer=self.optimizer,
                config=deepspeed_config(cfg))
            changed = [name for name, dtype in _dtypes(module).items() if before[name] != dtype]
            if changed:  # the precision plan is broken: say where, not at the first EMA update
                raise RuntimeError(f"DeepSpeed changed the dtype of {len(changed)} model parameters "
                                   f"(e.g. {changed[0]}: {before[changed[0]]} -> {_dtypes(module)[changed[0]]})")

    @property
    def backend(self) -> str:
        return f"deepspeed-zero{self.cfg.deepspeed.zero_stage}" if self.deepspeed else "plain"

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        """All ranks agree: one non-finite loss anywhere skips the step everywhere (a host sync)."""
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
        if self.deepspeed and world_size() > 1:
            import deepspeed.comm as dist

            dist.all_reduce(flag)
        return flag.item() == 0.0

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)
            if not self.ds_engine.is_gradient_accumulation_boundary():
                self.ds_engine.step()  # DeepSpeed counts micro-steps here; the real step is in step()
        else:
            (loss / self.cfg.train.grad_accum).backward()

    def step(self) -> tuple[float | None, bool]:
        """Clip and step. Returns (grad norm or None, stepped); a non-finite grad norm skips the step."""
        if self.ds_engine is not None:
            # Stage 0 keeps .grad on the parameters (already all-reduced by engine.backward); ZeRO 1/2
            # reduce into partitions and report the norm themselves after the step.
            grads = [p.grad for p in self.params if p.grad is not None]
            pre = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else None
            if pre is not None and not math.isfinite(pre):
                self.zero_grad()
                return pre, False
            self.ds_engine.step()
            norm = self.ds_engine.get_global_grad_norm()
            norm = pre if norm is None else float(norm)
            return norm, norm is None or math.isfinite(norm)
        clip = self.cfg.train.grad_clip
        grads = [p.grad for p in self.params if p.grad is not None]
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())
        norm = float(norm)  # host sync: needed to decide whether to step
        if not math.isfinite(norm):
            self.zero_grad()
            return norm, False
        self.optimizer.step()
        self.zero_grad()
        return norm, True

    def zero_grad(self) -> None:
        if self.ds_engine is not None:
            self.ds_engine.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def barrier(self) -> None:
        if self.deepspeed and world_size() > 1:
            import deepspeed.comm as dist

            dist.barrier()
