"""What do the Fisher-fidelity probes (``dykaf.fisher``) cost: one observe and one report of a
probed layer, by layer shape and window, and what share of a training step of the worker's task is
that at a given report cadence?

Per layer (default): times one ``observe()`` (ring copy + one factor update per shadow method) and
one report (all metrics, including an "own" DyKAF-like preconditioner) of a single probed layer for
several layer shapes and window sizes, with peak extra memory. With ``--worker``: the embedded GPT
task at the worker's ``TaskSpec`` defaults, stepped like the runner, observe and report timed in
isolation (modeled share per cadence) and, with ``--end-to-end EVERY``, whole report cycles with and
without the monitor. Where a *real run's* own ``fisher_time_s`` goes: ``bench/fisher_breakdown.py``.

    python -m bench.fisher_cost --quick                               # per layer, CPU
    python -m bench.fisher_cost --device cuda                         # CUDA timings use torch.cuda.Event
    python -m bench.fisher_cost --worker adamw,dykaf,soap --threads 1 --quick --end-to-end 250

CPU peak memory is the rise of the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs). glibc returns blocks above its mmap threshold (at most 32 MiB) to the OS on
free, so large temporaries are counted; smaller ones reused from the heap may not be.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import command_line, set_threads, write_text
from dykaf import build_optimizer
from dykaf.fisher import FisherMonitor, LayerProbe
from dykaf.fisher.weighted_fisher import spectral

MIB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------- timing and memory
class Clock:
    """Wall-clock seconds of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def _proc_status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (``VmHWM``: peak resident, ``VmRSS``: current) in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _hwm_mib() -> float | None:
    return _proc_status_mib("VmHWM")


def _current_rss_mib() -> float | None:
    return _proc_status_mib("VmRSS")


@contextmanager
def peak_extra_mib(device: torch.device, out: list[float | None]) -> Iterator[None]:
    """Append the peak memory above the starting level reached inside the block (MiB, or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        out.append((torch.cuda.max_memory_allocated() - base) / MIB)
        return
    base = _current_rss_mib()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        resettable = True
    except OSError:
        resettable = False
    yield
    peak = _hwm_mib()
    out.append(None if not resettable or base is None or peak is None else max(0.0, peak - base))


# ---------------------------------------------------------------------------- part 1: one layer
def _gradient_source(rows: int, cols: int, device: torch.device, seed: int) -> Callable[[], Tensor]:
    """Gradients from a 50/50 mixture of two Kronecker Fishers (``G = L Z R``): a Fisher that is
    not exactly Kronecker, so the power iteration does real work."""
    gen = torch.Generator(device=device).manual_seed(seed)
    factors = [
        (
            torch.randn(rows, rows, generator=gen, device=device) / math.sqrt(rows),
            torch.randn(cols, cols, generator=gen, device=device) / math.sqrt(cols),
        )
        for _ in range(2)
    ]
    state = {"t": 0}

    def draw() -> Tensor:
        state["t"] += 1
        left, right = factors[state["t"] % 2]
        return left @ torch.randn(rows, cols, generator=gen, device=device) @ right

    return draw


@dataclass
class _FakeOwn:
    """A DyKAF-like preconditioner state, so that reports include the "own" metrics' cost."""

    left: Tensor
    right: Tensor
    left_basis: Tensor | None
    right_basis: Tensor | None
    second_moment: Tensor
    matrix_shape: tuple[int, int]


@dataclass
class LayerCost:
    shape: tuple[int, int]
    window: int
    observe_ms: float
    observe_peak_mib: float | None
    report_ms: float
    report_peak_mib: float | None
    state_mib: float
    power_iterations: int
    measured: bool = True

    @staticmethod
    def extrapolated(base: LayerCost, window: int) -> LayerCost:
        """Estimate for a skipped window from a measured one of the same shape: report work is
        linear in W (Gram norm W², eigh W⁰ aside); observe does not depend on W."""
        rows, cols = base.shape
        shadows_mib = 3 * (rows * rows + cols * cols) * 4 / MIB
        return LayerCost(
            shape=base.shape,
            window=window,
            observe_ms=base.observe_ms,
            observe_peak_mib=None,
            report_ms=base.report_ms * window / base.window,
            report_peak_mib=None,
            state_mib=window * rows * cols * 4 / MIB + shadows_mib,
            power_iterations=0,
            measured=False,
        )


def bench_layer(rows: int, cols: int, window: int, device: torch.device, repeats: int) -> LayerCost:
    clock = Clock(device)
    param = torch.zeros(rows, cols, device=device)
    probe = LayerProbe(param, "bench", window=window, beta=0.95)
    draw = _gradient_source(rows, cols, device, seed=rows + cols + window)
    for _ in range(window):
        probe.observe(draw())
    observe_times: list[float] = []
    observe_peaks: list[float | None] = []
    for _ in range(max(3, repeats)):
        grad = draw()
        with peak_extra_mib(device, observe_peaks):
            observe_times.append(clock.time(lambda g=grad: probe.observe(g)))
    shadow = probe.shadows["dykaf"]
    assert shadow.left is not None and shadow.right is not None
    basis_l = spectral(shadow.left, rows, shadow.left).basis
    basis_r = spectral(shadow.right, cols, shadow.right).basis
    own = _FakeOwn(
        shadow.left, shadow.right, basis_l, basis_r, torch.rand(rows, cols, device=device), (rows, cols)
    )
    report_times: list[float] = []
    report_peaks: list[float | None] = []
    for _ in range(repeats):
        with peak_extra_mib(device, report_peaks):
            report_times.append(clock.time(lambda: probe.report(0, own)))
    state_bytes = 0 if probe.ring is None else probe.ring.numel() * probe.ring.element_size()
    for s in probe.shadows.values():
        for factor in (s.left, s.right):
            state_bytes += 0 if factor is None else factor.numel() * factor.element_size()
    return LayerCost(
        shape=(rows, cols),
        window=window,
        observe_ms=1e3 * statistics.median(observe_times),
        observe_peak_mib=_max_or_none(observe_peaks),
        report_ms=1e3 * statistics.median(report_times),
        report_peak_mib=_max_or_none(report_peaks),
        state_mib=state_bytes / MIB,
        power_iterations=probe.last_power_iterations,
    )


def _max_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


# ---------------------------------------------------------------------------- part 2: training
@dataclass
class TrainingCost:
    batch: int
    seq: int
    params_m: float
    layers: list[str]
    step_ms: float
    step_with_observe_ms: float
    observe_ms: float
    report_ms: float
    fisher_every: int
    label: str = "AdamW"
    power_iterations: list[int] | None = None
    # Steps before each report on which a scheduled monitor runs its shadows (None: every step).
    horizon: int | None = None
    # Measured end to end over whole report cycles: (cadence, plain ms/step, monitored ms/step).
    end_to_end: tuple[int, float, float] | None = None

    def active_fraction(self, fisher_every: int) -> float:
        """Share of steps that pay an observe under ``observe(step)`` with ``report_every``."""
        return 1.0 if self.horizon is None else min(fisher_every, self.horizon) / fisher_every

    def overhead_at(self, fisher_every: int) -> float:
        observe = self.observe_ms * self.active_fraction(fisher_every)
        return (observe + self.report_ms / fisher_every) / self.step_ms

    @property
    def overhead_isolated(self) -> float:
        return self.overhead_at(self.fisher_every)

    @property
    def overhead_measured(self) -> float:
        observe = (self.step_with_observe_ms - self.step_ms) * self.active_fraction(self.fisher_every)
        return (observe + self.report_ms / self.fisher_every) / self.step_ms


def bench_worker(
    device: torch.device,
    optimizer_name: str,
    steps: int,
    fisher_every: int,
    window: int,
    max_layers: int,
    end_to_end: int | None = None,
    replay: str = "auto",
) -> TrainingCost:
    """The embedded GPT task at the worker's ``TaskSpec`` defaults, stepped like ``worker.training.runner``
    (micro-batch, backward, clip to ``grad_clip``, observe, optimizer step; no eval, no logging).

    Components are timed in isolation (observe with the shadows running, report); with
    ``end_to_end`` (a cadence) the bench also times whole report cycles of that many steps, plain
    against monitored exactly as the runner does it (``observe(step)`` on a ``report_every``
    schedule and one report at the cycle's end), alternating two cycles of each. ``replay`` is the
    monitor's (``auto``: the shadows' updates as one CUDA graph per layer on a GPU; ``off``: eager).
    """
    import torch.nn.functional as F

    from server.jobs.spec import TaskSpec
    from worker.lm.data import WindowBatches
    from worker.lm.task import build_task

    spec = TaskSpec()
    task = build_task(spec, 0)
    model = task.model.to(device)
    named = task.trainable_parameters()
    params = [p for _, p in named]
    optimizer = build_optimizer(optimizer_name, named, {}, {n: task.roles[n] for n, _ in named})
    monitor = FisherMonitor(model, optimizer, window=window, max_layers=max_layers, replay=replay)
    batches = WindowBatches(task.train_tokens, spec.context, spec.batch_size, 0)
    clock = Clock(device)
    position = [0]

    def train_step(observer: Callable[[], None] | None) -> None:
        position[0] += 1
        inputs, targets = (t.to(device) for t in batches.batch(position[0]))
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null():
            logits = task.logits(model, inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.grad_clip if spec.grad_clip > 0 else math.inf)
        if observer is not None:
            observer()
        optimizer.step()

    for _ in range(max(3, window)):  # warm-up, fills the window, links own factors
        train_step(monitor.observe)
    plain, observed = [], []
    block = max(2, steps // 4)
    for _ in range(4):
        plain.append(clock.time(lambda: [train_step(None) for _ in range(block)]) / block)
        observed.append(clock.time(lambda: [train_step(monitor.observe) for _ in range(block)]) / block)
    train_step(None)
    observe_times = [clock.time(monitor.observe) for _ in range(5)]
    report_times = [clock.time(lambda: monitor.report(0)) for _ in range(3)]
    linked = [p.linked for p in monitor.probes.values() if p.linked]
    cycles = None
    if end_to_end:
        cycles = _end_to_end(model, optimizer, window, max_layers, end_to_end, train_step, clock, replay)
    return TrainingCost(
        batch=spec.batch_size,
        seq=spec.context,
        params_m=sum(p.numel() for p in params) / 1e6,
        layers=[f"{name} {tuple(p.param.shape)}" for name, p in monitor.probes.items()],
        step_ms=1e3 * statistics.median(plain),
        step_with_observe_ms=1e3 * statistics.median(observed),
        observe_ms=1e3 * statistics.median(observe_times),
        report_ms=1e3 * statistics.median(report_times),
        fisher_every=fisher_every,
        label=f"{optimizer_name} (own factors reused for: {', '.join(sorted(set(linked))) or 'none'}; "
        f"shadow updates: {_replay_label(monitor)})",
        power_iterations=[p.last_power_iterations for p in monitor.probes.values()],
        horizon=max(monitor.horizons.values()),
        end_to_end=cycles,
    )


def _end_to_end(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    window: int,
    max_layers: int,
    every: int,
    train_step: Callable[[Callable[[], None] | None], None],
    clock: Clock,
    replay: str,
) -> tuple[int, float, float]:
    """Median ms/step of ``every``-step cycles without and with a scheduled monitor (2 of each)."""
    scheduled = FisherMonitor(
        model, optimizer, window=window, max_layers=max_layers, report_every=every, replay=replay
    )
    step = [0]

    def monitored_cycle() -> None:
        for _ in range(every):
            step[0] += 1
            train_step(lambda: scheduled.observe(step[0]))
        scheduled.report(step[0])

    plain, monitored = [], []
    for _ in range(2):
        plain.append(clock.time(lambda: [train_step(None) for _ in range(every)]) / every)
        monitored.append(clock.time(monitored_cycle) / every)
    return every, 1e3 * statistics.median(plain), 1e3 * statistics.median(monitored)


def _replay_label(monitor: FisherMonitor) -> str:
    """How the probes ran their shadow updates: CUDA graph, eager, or eager after a failed capture."""
    modes = {probe.replay for probe in monitor.probes.values()}
    graphed = any(
        p._static is not None and p._static.backend == "cuda_graph" for p in monitor.probes.values()
    )
    if modes == {"cuda_graph"} and graphed:
        return "CUDA graph"
    return "eager" if modes <= {"off"} else "/".join(sorted(modes))


@contextmanager
def _null() -> Iterator[None]:
    yield


# ---------------------------------------------------------------------------- output
def _fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render(device: torch.device, command: str, layers: list[LayerCost]) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"## Fisher diagnostics cost — {device.type} ({name})",
        "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32, shadows: "
        "soap_shampoo + dykaf + dykaf_seq; report includes an own (DyKAF-like) preconditioner.",
        "",
        "| layer | W | observe ms | observe peak MiB | report ms | report peak MiB | state MiB "
        "| power iters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in layers:
        if c.measured:
            lines.append(
                f"| {c.shape[0]}×{c.shape[1]} | {c.window} | {c.observe_ms:.2f} "
                f"| {_fmt_mib(c.observe_peak_mib)} | {c.report_ms:.1f} | {_fmt_mib(c.report_peak_mib)} "
                f"| {c.state_mib:.1f} | {c.power_iterations} |"
            )
        else:
            lines.append(
                f"| {c.shape[0]}×{c.shape[1]} | {c.window} | (as above) | – "
                f"| ≈{c.report_ms:.0f} (not run; ∝ W from W={_measured_window(layers, c.shape)}) | – "
                f"| {c.state_mib:.1f} | – |"
            )
    return "\n".join(lines) + "\n"


def render_worker(command: str, results: list[TrainingCost], cadences: list[int]) -> str:
    t0 = results[0]
    lines = [
        "## Overhead on the embedded GPT task (worker `TaskSpec` defaults)",
        "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; model {t0.params_m:.2f} M "
        f"params, batch {t0.batch} × {t0.seq} tokens, grad clip as the runner; probes "
        + ", ".join(t0.layers)
        + ".",
        "",
        "| optimizer | step ms | step + observe ms | observe ms | report ms | Lanczos steps | "
        + " | ".join(f"overhead @ every {c}" for c in cadences)
        + " |",
        "|---|---:|---:|---:|---:|---|" + "---:|" * len(cadences),
    ]
    for t in results:
        lines.append(
            f"| {t.label} | {t.step_ms:.1f} | {t.step_with_observe_ms:.1f} | {t.observe_ms:.2f} "
            f"| {t.report_ms:.1f} | {t.power_iterations} | "
            + " | ".join(f"{100 * t.overhead_at(c):.1f}%" for c in cadences)
            + " |"
        )
    lines += [
        "",
        "overhead = (observe × active steps + report) / (fisher_every × plain step), observe and report "
        f"timed in isolation; a scheduled monitor (`report_every`) runs its shadows on the last "
        f"{t0.horizon} steps before each report (shadow_tail 1e-3 at β = 0.95) and fills its ring on "
        "the last W, so the active share is min(fisher_every, horizon) / fisher_every. The step + "
        "observe column is the in-loop check of the observe part.",
    ]
    measured = [t for t in results if t.end_to_end is not None]
    if measured:
        lines += [
            "",
            "End to end (whole report cycles as the runner runs them: `observe(step)` on the schedule "
            "and one report per cycle; median of 2 alternated cycles each):",
            "",
            "| optimizer | fisher_every | plain ms/step | monitored ms/step | overhead |",
            "|---|---:|---:|---:|---:|",
        ]
        for t in measured:
            every, plain, monitored = t.end_to_end  # type: ignore[misc]
            lines.append(
                f"| {t.label} | {every} | {plain:.1f} | {monitored:.1f} "
                f"| {100 * (monitored / plain - 1):.1f}% |"
            )
    return "\n".join(lines) + "\n"


def _measured_window(layers: list[LayerCost], shape: tuple[int, int]) -> int:
    return max(c.window for c in layers if c.shape == shape and c.measured)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument(
        "--quick", action="store_true", help="one timed report per layer; fewer timed steps with --worker"
    )
    parser.add_argument("--shapes", default="256x256,768x768,768x3072")
    parser.add_argument("--windows", default="8,32,64")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--max-gmac",
        type=float,
        default=None,
        help="skip (and extrapolate) layers whose one operator application W·mn(m+n) exceeds this many "
        "GMAC; default 75 with --quick on CPU, else no limit",
    )
    parser.add_argument(
        "--worker",
        default=None,
        help="only measure the embedded GPT task at the worker's TaskSpec defaults, for these "
        "comma-separated optimizers (e.g. adamw,dykaf,soap)",
    )
    parser.add_argument("--window", type=int, default=32, help="probe window W (--worker)")
    parser.add_argument(
        "--replay",
        default="auto",
        help="monitor replay modes to compare, e.g. auto,off (--worker; auto = CUDA graphs on a GPU)",
    )
    parser.add_argument("--max-layers", type=int, default=None, help="probed layers (--worker)")
    parser.add_argument("--cadences", default="50,100,250", help="fisher_every values to tabulate (--worker)")
    parser.add_argument(
        "--end-to-end",
        type=int,
        default=None,
        metavar="EVERY",
        help="also time whole report cycles of EVERY steps, plain vs monitored (--worker)",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    set_threads(args.threads)
    command = command_line(argv)
    repeats = 1 if args.quick else 3
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    windows = [int(w) for w in args.windows.split(",")]

    if args.worker:
        from dykaf.fisher.monitor import DEFAULT_MONITOR_LAYERS

        cadences = [int(c) for c in args.cadences.split(",")]
        results = []
        for name in args.worker.split(","):
            for replay in args.replay.split(","):
                results.append(
                    bench_worker(
                        device,
                        name,
                        steps=8 if args.quick else 20,
                        fisher_every=cadences[0],
                        window=args.window,
                        max_layers=args.max_layers or DEFAULT_MONITOR_LAYERS,
                        end_to_end=args.end_to_end,
                        replay=replay,
                    )
                )
                print(results[-1], flush=True)
        text = render_worker(command, results, cadences)
        print(text)
        if args.output is not None:
            write_text(args.output, text)
        return
    bench_layer(32, 16, 4, device, repeats=1)  # one-time library and allocator initialisation
    max_gmac = args.max_gmac
    if max_gmac is None and args.quick and device.type == "cpu":
        max_gmac = 75.0
    layers: list[LayerCost] = []
    for rows, cols in shapes:
        for window in windows:
            measured = [c for c in layers if c.shape == (rows, cols)]
            if max_gmac is not None and window * rows * cols * (rows + cols) > max_gmac * 1e9 and measured:
                layers.append(LayerCost.extrapolated(measured[-1], window))
                print(f"{rows}x{cols} W={window}: skipped (over --max-gmac), extrapolated", flush=True)
                continue
            cost = bench_layer(rows, cols, window, device, repeats)
            print(
                f"{rows}x{cols} W={window}: observe {cost.observe_ms:.2f} ms, report {cost.report_ms:.1f} ms "
                f"({cost.power_iterations} power iterations)",
                flush=True,
            )
            layers.append(cost)
    text = render(device, command, layers)
    print(text)
    if args.output is not None:
        write_text(args.output, text)


if __name__ == "__main__":
    main()
