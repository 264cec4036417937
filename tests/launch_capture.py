"""Compile what the op really launches, on a CPU-only machine.

The AOT gates (``test_kernels_compile_*.py``) build kernel variants from generic signatures.
Triton specialises every launch on its arguments: integers equal to 1 become constants, integers
and pointers divisible by 16 get a divisibility attribute. That decides how wide the loads are,
and whether the software pipeliner can turn a load into an asynchronous copy at all (it needs
at least 4-byte vectors). A generic signature cannot show it; a real launch can.

So this module runs the real host code (``lora_group``'s launchers) on CPU tensors with
``JITFunction.run`` replaced by a recorder, then compiles each recorded launch for a GPU target
with the specialisation Triton's own launcher would compute (``create_function_from_signature``
and ``JITFunction._pack_args``, the same two steps ``JITFunction.run`` takes). No kernel runs.

:func:`k_loop` reads the compiled TTGIR: it finds the loop that the source line of a kernel's
K-loop became (every loop carries its source location) and reports its synchronous global loads.
A ``tt.load`` left in the body of a pipelined K-loop is an operand the pipeliner could not make
asynchronous: every iteration stalls on a global-memory round trip.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re

LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
FILE_LOC = re.compile(r'^"([^"]+)":(\d+):\d+$')


@contextlib.contextmanager
def recording(sms: int = 132):
    """Record instead of launching every ``@triton.jit`` call made inside; yields the list of
    ``(jit_fn, args, kwargs)``. The TMA kernel is allowed (as on sm_90) and the persistent grid
    is ``sms`` programs (H100 and H200 have 132 SMs)."""
    from triton.runtime.jit import JITFunction

    from ril_fast.kernels import lora_tma

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    saved = JITFunction.run, lora_tma.available, lora_tma._programs
    JITFunction.run = record
    lora_tma.available = lambda device: True
    lora_tma._programs = lambda device: sms
    try:
        yield launches
    finally:
        JITFunction.run, lora_tma.available, lora_tma._programs = saved


_BINDERS: dict = {}  # (jit fn, cc) -> (target, backend, binder): Triton's own argument binder


def _specialise(fn, args, kwargs, cc: int):
    """Bind a recorded launch as ``JITFunction.run`` does on ``sm_<cc>``: (target, backend, kwargs,
    bound args, specialisation, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if (fn, cc) not in _BINDERS:
        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        _BINDERS[fn, cc] = target, backend, create_function_from_signature(fn.signature, fn.params, backend)
    target, backend, binder = _BINDERS[fn, cc]
    kwargs = dict(kwargs, debug=kwargs.get("debug", False))
    return (target, backend, kwargs, *binder(*args, **kwargs))


def compile_launch(fn, args, kwargs, cc: int = 90):
    """Compile one recorded launch for ``sm_<cc>`` as ``JITFunction.run`` would on that GPU; returns
    (CompiledKernel, ptxas report text)."""
    import triton
    from triton.compiler.compiler import ASTSource

    target, backend, kwargs, bound, specialization, opts = _specialise(fn, args, kwargs, cc)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas -v's report, printed under TRITON_DUMP_PTXAS_LOG
        ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return ck, log.getvalue()


def launch_key(fn, args, kwargs) -> str:
    """What Triton's cache keys a launch on (same key, same binary): the specialisation and options."""
    specialization = _specialise(fn, args, kwargs, 90)[4]
    return f"{fn.__name__}:{specialization}:{sorted(kwargs.items())}"


def _resolve(locs: dict, ref: str, depth: int = 0):
    """(file, line) a ``#locN`` alias names, following named and call-site locations."""
    body = locs.get(ref)
    if body is None or depth > 20:
        return None
    m = FILE_LOC.match(body)
    if m:
        return m.group(1), int(m.group(2))
    inner = re.search(r"(#loc\d*)", body)  # loc("name"(#locK)) or callsite(#locA at #locB): the first
    return _resolve(locs, inner.group(1), depth + 1) if inner else None


def loops(ttgir: str) -> list:
    """Every ``scf.for`` of ``ttgir``: ``(source line, header line, top-level body lines)``."""
    lines = ttgir.splitlines()
    locs = {}
    for t in lines:
        m = LOC_DEF.match(t.strip())
        if m:
            locs[m.group(1)] = m.group(2)
    out = []
    for i, line in enumerate(lines):
        if "scf.for" not in line or not line.rstrip().endswith("{"):
            continue
        depth, body, end = 0, [], None
        for t in (x.strip() for x in lines[i + 1:]):
            if depth == 0 and t.startswith("}"):
                end = t
                break
            if depth == 0:
                body.append(t)
            depth += t.endswith("{") - t.startswith("}")
        ref = re.search(r"loc\((#loc\d*)\)\s*$", end or "")
        where = _resolve(locs, ref.group(1)) if ref else None
        out.append((where[1] if where else None, line.strip(), body))
    return out


def source_line(fn, text: str) -> int:
    """File line of the first line of ``fn``'s source containing ``text`` (a K-loop header)."""
    src, first = inspect.getsourcelines(fn.fn if hasattr(fn, "fn") else fn)
    for n, t in enumerate(src):
        if text in t:
            return first + n
    raise ValueError(f"{text!r} not in {fn.__name__}")


K_DOT = re.compile(r"ttng\.warp_group_dot .*\} : !ttg\.memdesc")  # wgmma with A from shared memory
K_ACC = re.compile(r"-> \(.*tensor<[0-9x]+xf32, #mma")  # a loop carrying an MMA accumulator


def _prefetches(body: list) -> bool:
    """A software-pipelined K-loop waits first for data an earlier iteration loaded, then issues
    the copies for a later one; a loop the pipeliner left alone issues its copies and waits on them
    in the same iteration (asynchronous copies, nothing prefetched)."""
    copy = next((i for i, t in enumerate(body) if "async_tma_copy_global_to_local" in t
                 or "async_copy_global_to_local" in t), None)
    wait = next((i for i, t in enumerate(body) if "ttng.wait_barrier" in t or "ttg.async_wait" in t), None)
    return copy is not None and wait is not None and wait < copy


def k_loop_tmem(ttgir: str, lines) -> dict:
    """:func:`k_loop` for sm_100 (tcgen05): the accumulator lives in tensor memory, so no copy of the
    loop carries an MMA register tile to pick it by; every copy of the K-loop's source ``lines`` is
    read (the pointer kernels are not persistent: one copy each)."""
    found = [body for where, _, body in loops(ttgir) if where in lines]
    sync = [t[:160] for b in found for t in b if re.search(r"= tt\.load ", t)]
    return {"loops": len(found), "pipelined": bool(found) and all(_prefetches(b) for b in found),
            "sync_loads": sync, "tcgen05_mma": sum("tc_gen5_mma" in t for b in found for t in b)}


def k_loop(ttgir: str, lines, wgmma: bool = True) -> dict:
    """The loop compiled from source ``lines`` (sm_90): how many loops it became, whether its K-loop
    is pipelined, and the synchronous global loads left at the top level of the K-loop's body.

    The K-loop is the copy that carries an MMA accumulator from one iteration to the next and
    issues wgmma with A read from shared memory (the pipelined operand). A flattened persistent
    loop also leaves a copy for K = 0 that holds only the epilogue and carries no accumulator
    (its dots may read shared memory too: the fused backward's dA reads X's tile there); its loads
    are once per tile, not per K-step. ``wgmma=False`` (sm_8x: ``tt.dot`` on register operands, no
    persistent kernels there) takes every copy that carries an MMA accumulator."""
    found = [(head, body) for where, head, body in loops(ttgir) if where in lines]
    main = [b for head, b in found if K_ACC.search(head) and (not wgmma or any(K_DOT.search(t) for t in b))]
    piped = [b for b in main if _prefetches(b)]
    sync = [t[:160] for b in main for t in b if re.search(r"= tt\.load ", t)]
    # wgmma groups each wait leaves in flight: 0 drains the queue (the tensor cores then idle until
    # the next issue), >= 1 keeps the previous K-step's MMA running under this one's loads
    waits = [int(n) for b in main for t in b for n in re.findall(r"warp_group_dot_wait .*\{pendings = (\d+)", t)]
    return {"loops": len(found), "pipelined": bool(main) and len(piped) == len(main), "sync_loads": sync,
            "wgmma_waits": waits}
