"""``FisherMonitor``: probes a few layers of a model during training (see README.md here).

Usage, every step::

    monitor = FisherMonitor(model, optimizer, report_every=fisher_every, last_step=steps)
    ...
    loss.backward()
    monitor.observe(step)      # copy probed grads, one shadow factor update per method (when due)
    optimizer.step()
    if monitor.is_report_step(step):
        sink.log_fisher(monitor.report(step))

With ``report_every`` and the step number, ``observe`` only does the work the next report can
see: the ring is filled during the last ``window`` steps before it and the shadows run during the
last ``shadow_horizon`` steps (older gradients weigh < ``shadow_tail`` in a β-decayed estimator).
Without them every step pays the full observe (reports may then come at any step).

A training loop that can take rows later uses ``submit_report(step)`` instead of ``report`` and
logs ``finished_reports()`` every step (``finished_reports(wait=True)`` before a checkpoint, and
``close()`` at the end): the report then runs on a background thread where that is free
(``background.py``) and the loop does not wait for it.

The monitor only reads gradients and optimizer state: training is bit-identical with or without it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dykaf.fisher.background import ReportWorker, snapshot_own, use_background
from dykaf.fisher.probe import DEFAULT_BETA, DEFAULT_WINDOW, LayerProbe
from dykaf.fisher.rows import SHADOW_METHODS, FisherRow
from dykaf.fisher.selection import select_layers

# Layers the monitor probes by default ("auto"): the attention input projection and the MLP
# up-projection of the first block. Each probed layer costs about 5 SOAP factor updates per step
# (3 with a DyKAF run's own factors reused); see README "Cost".
DEFAULT_MONITOR_LAYERS = 2


# Shadows skip updates whose gradients would weigh less than this in the next report's factors.
DEFAULT_SHADOW_TAIL = 1e-3


def optimizer_beta(optimizer: torch.optim.Optimizer | None, param: Tensor) -> float:
    """The Kronecker-factor decay the optimizer uses for ``param``, else 0.95.

    For a Kronecker-factored optimizer (its group has ``shampoo_beta``: DyKAF, SOAP, the registry's
    Shampoo) that is ``shampoo_beta``, else ``betas[1]``, exactly as the optimizer decays its
    factors; measuring against the Fisher the optimizer itself tries to track makes "own"
    comparable to the shadows.
    Other optimizers (AdamW, Muon, SGD, ...) have no factors: their ``betas[1]`` decays a diagonal
    second moment (AdamW's 0.999 would make ``H``'s weights flat over the window while the shadows
    average ~1000 steps), so their runs use the factor optimizers' default, 0.95.
    """
    if optimizer is None:
        return DEFAULT_BETA
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            if "shampoo_beta" not in group:
                return DEFAULT_BETA
            if group["shampoo_beta"] is not None:
                return float(group["shampoo_beta"])
            betas = group.get("betas")
            if isinstance(betas, Sequence) and len(betas) > 1:
                return float(betas[1])
            return DEFAULT_BETA
    return DEFAULT_BETA


class FisherMonitor:
    """Fisher-fidelity diagnostics for selected layers of ``model``.

    ``layers``: ``"auto"`` (at most ``max_layers`` representative hidden matrices) or parameter
    names. ``beta`` defaults per layer to the optimizer's factor decay. ``methods`` are the shadow
    estimators run on the side (all of ``SHADOW_METHODS`` by default).

    ``report_every`` (the caller's ``fisher_every``; None = reports at any step) and ``last_step``
    (the run's final step, also reported at when given): the steps ``report`` will be called at,
    which lets ``observe(step)`` skip the work no report can see (module docstring);
    ``shadow_tail`` bounds the weight of the history the shadows drop by restarting before each
    report.

    ``reuse_own`` (default True): when the training optimizer's factors for a probed layer are
    exactly what one shadow would compute (DyKAF with ``kron`` init → ``dykaf``/``dykaf_seq``, SOAP →
    ``soap_shampoo``; same β, shape and history, see ``LayerProbe.link``), that shadow is not run
    and its rows are computed from the optimizer's factors. Rows and values are unchanged; False
    forces every shadow to run (for checking that equality).

    ``replay``: how each probe runs its shadows' per-step updates (``LayerProbe``; ``auto`` uses
    a CUDA graph per probed layer on a GPU, where these small updates are launch-bound).
    ``background`` (``auto``/``on``/``off``): where ``submit_report`` computes (``background.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        layers: str | Sequence[str] = "auto",
        window: int = DEFAULT_WINDOW,
        beta: float | None = None,
        *,
        max_layers: int = DEFAULT_MONITOR_LAYERS,
        methods: Iterable[str] = SHADOW_METHODS,
        tol: float | None = None,
        max_iter: int = 100,
        reuse_own: bool = True,
        report_every: int | None = None,
        last_step: int | None = None,
        shadow_tail: float = DEFAULT_SHADOW_TAIL,
        replay: str = "auto",
        background: str = "auto",
    ) -> None:
        if report_every is not None and report_every < 1:
            raise ValueError(f"report_every must be ≥ 1 (or None), got {report_every}")
        if last_step is not None and last_step < 1:
            raise ValueError(f"last_step must be ≥ 1 (or None), got {last_step}")
        self.model = model
        self.optimizer = optimizer
        self.reuse_own = reuse_own
        self.report_every = report_every
        self.last_step = last_step
        self.shadow_tail = shadow_tail
        params = dict(model.named_parameters())
        methods = tuple(methods)
        self.probes: dict[str, LayerProbe] = {
            name: LayerProbe(
                params[name],
                name,
                window=window,
                beta=optimizer_beta(optimizer, params[name]) if beta is None else beta,
                methods=methods,
                tol=tol,
                max_iter=max_iter,
                replay=replay,
            )
            for name in select_layers(model, layers, max_layers)
        }
        self.horizons = {name: probe.shadow_horizon(shadow_tail) for name, probe in self.probes.items()}
        use_background(background, [])  # validates the mode now rather than at the first report
        self.background = background
        self._reports = ReportWorker()
        self._report_stream: torch.cuda.Stream | None = None

    @property
    def layers(self) -> list[str]:
        """Names of the probed parameters."""
        return list(self.probes)

    @torch.no_grad()
    def observe(self, step: int | None = None) -> None:
        """Record this step's gradients of the probed layers; call after backward, before step().

        ``step`` (with ``report_every``): the step about to be taken. Only the work the next
        scheduled report can see is done: the ring records the last ``window`` steps before it,
        the shadows run for the last ``horizons[layer]`` steps, restarting from scratch when they
        enter that stretch after a skipped one (steps count down by one between reports, so the
        entry is always at ``horizon - 1`` steps to go).
        """
        state_of = self._own_state_reader()
        until_report = self.steps_until_report(step)
        if self._reports.busy and self._touches_probes(until_report, callable(state_of)):
            self._reports.join()  # a background report still reads the ring and shadows
        for name, probe in self.probes.items():
            linking = callable(state_of) and not probe.link_decided
            if linking:
                probe.link(state_of(probe.param))
            record, feed, restart = self._work_for(name, probe, until_report, linking)
            if restart:
                probe.restart_shadows()
            probe.observe(record=record, feed_shadows=feed)

    def has_work(self, step: int | None = None) -> bool:
        """Whether ``observe(step)`` would touch anything (record, feed a shadow, decide a link).

        Between a report and the next burn-in most steps have nothing to do; a loop that times its
        diagnostics with device synchronisation skips the call then, and with it two device syncs
        per idle step.
        """
        return self._touches_probes(self.steps_until_report(step), callable(self._own_state_reader()))

    def _own_state_reader(self) -> Any:
        """The optimizer's ``preconditioner_state`` when own factors may be linked, else None."""
        return getattr(self.optimizer, "preconditioner_state", None) if self.reuse_own else None

    def _work_for(
        self, name: str, probe: LayerProbe, until_report: int | None, linking: bool
    ) -> tuple[bool, bool, bool]:
        """``(record, feed, restart)`` for ``probe`` at ``until_report`` steps before a report."""
        if until_report is None:
            return True, True, False
        horizon = self.horizons[name]
        truncated = self.report_every is not None and self.report_every > horizon
        # Until the link is decided the shadows must see every gradient the optimizer sees.
        feed = linking or not truncated or until_report < horizon
        restart = truncated and until_report == horizon - 1 and not linking
        return until_report < probe.window, feed, restart

    def _touches_probes(self, until_report: int | None, linking_possible: bool) -> bool:
        """Whether ``observe`` at this distance from the next report writes a ring or a shadow."""
        return any(
            any(self._work_for(name, probe, until_report, linking_possible and not probe.link_decided))
            for name, probe in self.probes.items()
        )

    def is_report_step(self, step: int) -> bool:
        """Whether ``step`` is one of the steps the schedule reports at (always True without one)."""
        return self.steps_until_report(step) in (None, 0)

    def steps_until_report(self, step: int | None) -> int | None:
        """Steps from ``step`` to the next scheduled report (0 = report at ``step``); None = unknown."""
        if step is None or self.report_every is None:
            return None
        until = (-step) % self.report_every
        if self.last_step is not None and step <= self.last_step:
            until = min(until, self.last_step - step)
        return until

    @torch.no_grad()
    def report(self, step: int) -> list[FisherRow]:
        """All diagnostics of all probed layers at ``step`` (heavy; call every ``fisher_every``)."""
        self._reports.join()
        return self._rows(step, self._own_states(snapshot=False))

    def _own_states(self, *, snapshot: bool) -> dict[str, object | None]:
        state_of = getattr(self.optimizer, "preconditioner_state", None)
        owns: dict[str, object | None] = {}
        for name, probe in self.probes.items():
            own = state_of(probe.param) if callable(state_of) else None
            owns[name] = snapshot_own(own) if snapshot else own
        return owns

    def _rows(self, step: int, owns: dict[str, Any]) -> list[FisherRow]:
        rows: list[FisherRow] = []
        for name, probe in self.probes.items():
            rows.extend(probe.report(step, owns[name]))
        return rows

    @torch.no_grad()
    def submit_report(self, step: int) -> None:
        """Start the report at ``step``; its rows come out of ``finished_reports``.

        Computed on the background thread when ``background`` allows it (the optimizer's state is
        copied first, so training can step on), else right here.
        """
        params = [probe.param for probe in self.probes.values()]
        if not use_background(self.background, params):
            self._reports.add(self.report(step))  # report() first waits for a running one
            return
        owns = self._own_states(snapshot=True)
        device = params[0].device if params else torch.device("cpu")
        ready = None
        if device.type == "cuda":
            # The report's stream must see the gradients and the copies queued so far.
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        self._reports.submit(functools.partial(self._background_rows, step, owns, device, ready))

    def _background_rows(
        self, step: int, owns: dict[str, Any], device: torch.device, ready: Any
    ) -> list[FisherRow]:
        with torch.no_grad():
            if ready is None:
                return self._rows(step, owns)
            with torch.cuda.device(device):
                if self._report_stream is None:
                    self._report_stream = torch.cuda.Stream(device=device)
                stream = self._report_stream
                stream.wait_event(ready)
                with torch.cuda.stream(stream):
                    rows = self._rows(step, owns)
                stream.synchronize()
                return rows

    def finished_reports(self, wait: bool = False) -> list[FisherRow]:
        """Rows of the reports finished since the last call (``wait``: also the running one).

        A report's exception is raised here, in the caller's thread.
        """
        return self._reports.take(wait=wait)

    def close(self) -> list[FisherRow]:
        """Wait for a running report and stop the background thread; returns rows not yet taken."""
        return self._reports.close()

    def state_dict(self) -> dict[str, Any]:
        """Per-layer probe state, for checkpoints (after any running report has finished)."""
        self._reports.join()
        return {name: probe.state_dict() for name, probe in self.probes.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore probe state saved by ``state_dict`` (layers not probed now are ignored)."""
        self._reports.join()
        for name, probe_state in state.items():
            if name in self.probes:
                self.probes[name].load_state_dict(probe_state)
