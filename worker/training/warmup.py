"""Pay a GPU's once-per-process start-up costs before a run's clocks start.

A CUDA process sets up most libraries and kernels lazily, on their first use: cuSOLVER (library,
handle, workspace, eigensolver kernels), the cuBLAS GEMMs of each dtype, the CUDA-graph machinery.
Without a warm-up that cost lands in whichever run of a worker process first needs the piece, and
in whichever phase of it. On a GPU the default job's first run, AdamW, spent more time in its
Fisher diagnostics than the same run in a process that had used the solver before (figures:
BENCHMARKS.md, "Diagnostics overhead"): AdamW never calls ``eigh`` itself, so the
diagnostics' first shadow initialisation paid for the process. A SOAP or DyKAF run that came first
would pay it in its first optimizer step instead. Either way a run's figures depended on the order
in which a worker happened to execute runs, which an optimizer comparison must not.

So before a run's timed phases, ``warm_up`` does on the run's device the kinds of work the run will
do, at the run's own shapes, once per process: the eigendecomposition and the QR refresh of
``dykaf.eigenbasis`` at every side of a trainable matrix (the optimizers' Kronecker factors, up to
``WARM_SOLVER_UP_TO``), a throwaway copy of every probe through shadow initialisation, CUDA-graph
capture and one report over a full window (on a thread and stream of its own when the run's
reports are computed beside training: ``_report_beside``), and the GEMMs of the autocast dtypes.
It never touches
the model, its gradients, the probes or any global RNG. The runner keeps the seconds it took out of
train and Fisher time and reports them apart, as the summary's ``device_warmup_s`` (0 for every
later run of the process).

Only on CUDA (``WARMED_DEVICE_TYPES``): a CPU links BLAS/LAPACK at import and loads no kernels
lazily (a fresh process's first ``eigh`` and QR cost about what later ones do), while the warm-up
would cost the default task far more than that, mostly in the probes'
reports. Identical runs in one fresh CPU
process spend the same CPU time in their diagnostics (BENCHMARKS.md, "Diagnostics overhead"): there
is nothing to move.

A warm-up that fails (out of memory on a small card, a solver error) is logged and cut short: it is
an optimisation, and whatever broke it will show in the run itself if it matters there.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from dykaf import eigenbasis
from dykaf.fisher.background import use_background

log = logging.getLogger(__name__)

# Device types whose process start-up costs are paid up front (module docstring).
WARMED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

# Largest factor side warmed with its own solves. Optimizers precondition up to their
# ``max_precond_dim`` (SOAP's default 10000), but a side that large costs seconds to solve
# on a consumer GPU, and the kernels of smaller sides cover most of what it would load.
WARM_SOLVER_UP_TO = 4096

# Fewest gradients fed to a throwaway probe: the first initialises its shadows eagerly, the second
# captures the static step (a CUDA graph on a GPU), the third replays it. A full window is fed
# when longer, so that the report multiplies tensors of the real run's shapes.
_PROBE_STEPS = 3

_lock = threading.Lock()
_done: set[Hashable] = set()


def factor_sides(params: Iterable[torch.Tensor]) -> set[int]:
    """Sides of the Kronecker factors a matrix optimizer keeps for ``params``: ``shape[0]`` and the
    product of the rest, for every parameter with two or more dimensions."""
    sides: set[int] = set()
    for param in params:
        if param.ndim >= 2:
            sides.update((param.shape[0], math.prod(param.shape[1:])))
    return sides


def warm_up(device: torch.device, params: Iterable[torch.Tensor], monitor: Any = None) -> float:
    """Warm ``device`` for a run training ``params`` (probed by ``monitor``, a ``FisherMonitor`` or
    None); returns the seconds spent, 0.0 when everything was already warm in this process."""
    if device.type not in WARMED_DEVICE_TYPES:
        return 0.0
    start = time.perf_counter()
    did = False
    with _lock, torch.no_grad():
        try:
            generator = torch.Generator(device=device)
            generator.manual_seed(0)
            did = _warm_gemms(device, generator)
            did |= _warm_solver(device, factor_sides(params), generator)
            did |= _warm_probes(device, monitor, generator)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except RuntimeError as exc:  # out of memory, a solver failure: the run itself decides
            did = True
            log.warning("device warm-up on %s stopped early (%s); the run goes on without it", device, exc)
    if not did:
        return 0.0
    elapsed = time.perf_counter() - start
    log.info("warmed %s for this process in %.3f s (kept out of the run's timings)", device, elapsed)
    return elapsed


def _first_time(key: Hashable) -> bool:
    """True once per ``key`` and process (callers hold ``_lock``)."""
    if key in _done:
        return False
    _done.add(key)
    return True


def _warm_gemms(device: torch.device, generator: torch.Generator) -> bool:
    """GEMMs in the dtypes a run multiplies in: float32 and float64 (optimizer and diagnostics
    algebra) and, under the runner's autocast, bfloat16."""
    if not _first_time(("gemm", str(device))):
        return False
    matrix = torch.randn(64, 64, generator=generator, device=device)
    _ = matrix @ matrix
    _ = matrix.double() @ matrix.double()
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _ = matrix @ matrix
    return True


def _warm_solver(device: torch.device, sides: set[int], generator: torch.Generator) -> bool:
    """Per side not yet warmed, what the optimizers do to a factor of that side: its
    ``dykaf.eigenbasis.initial`` basis (float32 input, so ``eigh`` takes the path, float64 or
    float32 first, that the factors of that side will take) and one ``refresh``, on a
    well-conditioned SPD matrix."""
    did = False
    for side in sorted(sides):
        if side > WARM_SOLVER_UP_TO or not _first_time(("solver", str(device), side)):
            continue
        matrix = torch.randn(side, side, generator=generator, device=device)
        spd = torch.addmm(torch.eye(side, device=device), matrix, matrix.T, alpha=1.0 / side)
        eigenbasis.refresh(spd, eigenbasis.initial(spd))
        did = True
    return did


def _reports_beside_training(monitor: Any) -> bool:
    """Whether ``monitor`` will compute its reports on its background thread (``submit_report``)."""
    params = [probe.param for probe in monitor.probes.values()]
    return bool(params) and use_background(getattr(monitor, "background", "off"), params)


def _report_beside(probe: Any, device: torch.device) -> None:
    """``probe.report`` where a run's background report computes (``FisherMonitor._background_rows``):
    on another thread and, on a GPU, on a stream of its own.

    A library handle (cuBLAS, cuSOLVER) belongs to the thread that made it, and a stream's first
    allocations and workspaces are its own: a report on a new thread would create them inside the
    first run's Fisher time (the loop waits for the last report at the run's end). Made here, on a
    thread that then ends, they go back to torch's handle pools for the run's report thread to reuse.
    """

    def report() -> None:
        with torch.no_grad():
            if device.type != "cuda":
                probe.report(0)
                return
            with torch.cuda.device(device):
                stream = torch.cuda.Stream(device=device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    probe.report(0)
                stream.synchronize()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fisher-warm-up") as pool:
        pool.submit(report).result()


def _warm_probes(device: torch.device, monitor: Any, generator: torch.Generator) -> bool:
    """Each probe's work once, on a throwaway probe of the same class, shape and settings fed
    random gradients: shadow initialisation, static-step capture and replay, a report (computed
    where the run's reports will be: in this thread, or beside it as ``_report_beside`` does)."""
    if monitor is None:
        return False
    beside = _reports_beside_training(monitor)
    did = False
    for probe in monitor.probes.values():
        methods = tuple(probe.shadows)
        key = ("probe", str(device), probe.shape, probe.window, probe.dtype, methods, probe.replay, beside)
        if not _first_time(key):
            continue
        param = torch.zeros(probe.shape, dtype=probe.param.dtype, device=device)
        throwaway = type(probe)(
            param,
            probe.name,
            window=probe.window,
            beta=probe.beta,
            methods=methods,
            tol=probe.tol,
            max_iter=probe.max_iter,
            replay=probe.replay,
        )
        for _ in range(max(_PROBE_STEPS, probe.window)):
            grad = torch.randn(probe.shape, generator=generator, device=device, dtype=param.dtype)
            throwaway.observe(grad)
        if beside:
            _report_beside(throwaway, device)
        else:
            throwaway.report(0)
        did = True
    return did
