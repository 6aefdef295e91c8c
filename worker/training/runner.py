"""Execute one training run: ``execute_run(spec, sink, ...) -> RunResult``.

The loop is deliberately plain: micro-batches with gradient accumulation (bf16 autocast on CUDA),
Fisher observation of the raw gradient, clipping, the optimizer step and the LR schedule, periodic
evaluation on a fixed validation set, metrics to a sink, checkpoints to a directory.

Guarantees the comparison relies on:
- same seed ⇒ same initial weights and the same batches in the same order for every optimizer;
- a run resumed from a checkpoint ends bit-identical (on CPU) to one that never stopped, because the
  checkpoint carries model, optimizer, scheduler and RNG states and the data position is a function
  of the step;
- an N-device run (``task.devices_per_run``, one process per device under torch.distributed, see
  ``distributed.py``) trains on exactly the micro-batches of a 1-device run with N times the
  accumulation: at step s, rank r takes micro-batches ``(s-1)·A·N + r·A + j`` for ``j < A``
  (``A = grad_accum``), the ones the 1-device run takes as its micro-batches ``r·A … r·A+A-1``;
  DDP averages the gradients, so the step is the same up to floating-point summation order (and,
  with dropout, each rank's own dropout stream);
- a non-finite loss, gradient or update ends the run as ``diverged`` (with step and reason), and so
  does a breakdown of the optimizer's own linear algebra (``torch.linalg.LinAlgError``: an
  eigendecomposition or inverse root of statistics blown up by too large a step); any other
  exception ends it as ``failed``; neither escapes to the caller, so sibling runs are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from dykaf.baselines.registry import build_optimizer
from dykaf.distributed import build_sharded_optimizer
from dykaf.fisher import FisherMonitor
from dykaf.fisher.monitor import DEFAULT_MONITOR_LAYERS
from dykaf.fisher.selection import select_layers
from server.jobs.spec import RunSpec
from server.jobs.status import RunStatus
from server.metrics_registry import OPERATORS, metric
from worker.lm.data import WindowBatches, validation_batches
from worker.lm.task import LMTask, build_task
from worker.lm.throughput import device_peak_flops, mfu
from worker.training import checkpoint as ckpt
from worker.training import measure, warmup
from worker.training.distributed import Ranks, rank_seed
from worker.training.schedule import build_scheduler
from worker.training.sinks import MetricSink

log = logging.getLogger(__name__)

_T = TypeVar("_T")
ProgressFn = Callable[[int, int, Mapping[str, float]], None]


@dataclass
class RunResult:
    """Outcome of a run. ``summary`` holds final/best losses, time-to-target, costs (floats only)."""

    status: RunStatus
    reason: str | None
    final_step: int
    summary: dict[str, float] = field(default_factory=dict)


class Diverged(Exception):
    """Raised inside the loop when training produced a non-finite value."""


def resolve_device(preference: str | torch.device | None) -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is an error, not a fallback."""
    if isinstance(preference, torch.device):
        return preference
    if preference in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(preference).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this worker")
    return torch.device(preference)


def spec_fingerprint(spec: RunSpec) -> str:
    """Identifies what a checkpoint belongs to (the device may change between attempts)."""
    return hashlib.sha256(spec.model_dump_json(exclude={"device"}).encode()).hexdigest()


@dataclass
class _Tracker:
    """Running aggregates for the summary; part of the checkpoint so they survive a resume."""

    target_loss: float | None
    # A ``{name, op, value}`` target on any evaluated metric (``target_loss`` x is val_loss <= x).
    target: Mapping[str, Any] | None = None
    train_time: float = 0.0
    wall_offset: float = 0.0
    fwd_bwd_total: float = 0.0
    optimizer_total: float = 0.0
    # Time spent in the Fisher diagnostics (observe + report). Kept out of ``train_time`` and the
    # step times: the probes cost different optimizers different amounts (a DyKAF or SOAP run reuses
    # its own factors for one shadow), so billing them to training would skew time-to-target.
    fisher_total: float = 0.0
    # Device start-up paid before this run's timed phases (``warmup.py``); in no other figure.
    warmup_total: float = 0.0
    tokens_total: int = 0
    timed_steps: int = 0
    best_val: float = math.inf
    best_val_step: int = -1
    final_val: float = math.nan
    final_train: float = math.nan
    steps_to_target: int = -1
    time_to_target: float = math.nan
    peak_memory_mb: float = 0.0
    # Task-quality metrics (val_accuracy, ...): last value and best value in the metric's direction.
    task_final: dict[str, float] = field(default_factory=dict)
    task_best: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target is None and self.target_loss is not None:
            self.target = {"name": "val_loss", "op": "<=", "value": self.target_loss}

    def observe_val(self, step: int, loss: float, metrics: Mapping[str, float] | None = None) -> None:
        self.final_val = loss
        if loss < self.best_val:
            self.best_val, self.best_val_step = loss, step
        for name, value in (metrics or {}).items():
            self.task_final[name] = value
            best = self.task_best.get(name)
            higher = metric(name).higher_is_better
            if math.isfinite(value) and (best is None or (value > best if higher else value < best)):
                self.task_best[name] = value
        if self.target is not None and self.steps_to_target < 0:
            seen = {"val_loss": loss, **(metrics or {})}
            value = seen.get(self.target["name"])
            if value is not None and OPERATORS[self.target["op"]](value, self.target["value"]):
                self.steps_to_target, self.time_to_target = step, self.train_time

    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            if key not in ("target_loss", "target"):
                setattr(self, key, value)

    def summary(self, final_step: int, wall_time: float, info: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {
            "final_step": float(final_step),
            "final_train_loss": self.final_train,
            "final_val_loss": self.final_val,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else math.nan,
            "train_time_s": self.train_time,
            "wall_time_s": wall_time,
            "peak_memory_mb": self.peak_memory_mb,
            "fisher_time_s": self.fisher_total,
            "device_warmup_s": self.warmup_total,
        }
        if self.best_val_step >= 0:  # a run that never evaluated has no best step (not -1)
            out["best_val_step"] = float(self.best_val_step)
        if self.train_time > 0:
            out["fisher_overhead"] = self.fisher_total / self.train_time
        if self.timed_steps:
            out["step_time_ms"] = 1000 * (self.fwd_bwd_total + self.optimizer_total) / self.timed_steps
            out["fwd_bwd_ms"] = 1000 * self.fwd_bwd_total / self.timed_steps
            out["optimizer_ms"] = 1000 * self.optimizer_total / self.timed_steps
        if self.train_time > 0:
            out["tokens_per_s"] = self.tokens_total / self.train_time
            out.update(_throughput(out["tokens_per_s"], info))
        if self.fwd_bwd_total + self.optimizer_total > 0:
            # The optimizer's share of a step (forward/backward + optimizer; diagnostics excluded).
            out["optimizer_share"] = self.optimizer_total / (self.fwd_bwd_total + self.optimizer_total)
        for name, value in self.task_final.items():
            out[f"final_{name}"] = value
        for name, value in self.task_best.items():
            out[f"best_{name}"] = value
        if self.target is not None:
            out["reached_target"] = float(self.steps_to_target >= 0)
            if self.steps_to_target >= 0:
                out["steps_to_target"] = float(self.steps_to_target)
                out["time_to_target_s"] = self.time_to_target
        for key in ("parameters", "trainable_parameters"):
            if key in info:
                out[key] = float(info[key])
        if "compile_s" in info:
            out["compile_time_s"] = float(info["compile_s"])  # kept out of every time above
        return out


def _throughput(tokens_per_s: float, info: Mapping[str, Any]) -> dict[str, float]:
    """Model FLOPs per token, achieved TFLOP/s and MFU (only on a GPU of known peak)."""
    per_token = info.get("flops_per_token")
    if not per_token:
        return {}
    out = {"flops_per_token": float(per_token), "model_tflops": tokens_per_s * per_token / 1e12}
    utilisation = mfu(tokens_per_s, per_token, info.get("peak_flops"))
    if utilisation is not None:
        out["mfu"] = utilisation
    return out


def _to_device(inputs: Any, device: torch.device) -> Any:
    """A tensor, or a dict of tensors (example-based tasks: input ids and attention mask)."""
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _Run:
    """State of one run in progress; ``train()`` returns the result or raises ``Diverged``."""

    def __init__(
        self,
        spec: RunSpec,
        sink: MetricSink,
        device: torch.device,
        checkpoint_dir: Path | None,
        should_cancel: Callable[[], bool],
        progress: ProgressFn | None,
        ranks: Ranks,
    ) -> None:
        self.spec, self.sink, self.device, self.ranks = spec, sink, device, ranks
        self.checkpoint_dir, self.should_cancel, self.progress = checkpoint_dir, should_cancel, progress
        self.task_spec = spec.task
        target = spec.target_metric.model_dump() if spec.target_metric is not None else None
        self.tracker = _Tracker(target_loss=spec.target_loss, target=target)
        self.step = 0
        self.started = time.perf_counter()
        self.task: LMTask | None = None
        self.fisher: Any = None  # the FisherMonitor, set by build() when diagnostics are on
        self.warmup_s = 0.0  # device start-up paid by build() (``warmup.py``)

    # -- set-up -------------------------------------------------------------------------------
    def build(self) -> None:
        task = build_task(self.task_spec, self.spec.seed)
        self.task = task
        t = self.task_spec
        self.model = task.model.to(self.device)
        # Training forwards go through ``train_module`` (DDP on several devices: it averages the
        # gradients) and ``forward_model`` (that, compiled); state dicts, hooks, evaluation and
        # exports use ``model`` itself.
        self.train_module: torch.nn.Module = self.model
        if self.ranks.active:
            self.train_module = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Fine-tuned models may hold parameters a task's forward never reaches (a pooler).
                find_unused_parameters=t.kind != "pretrain",
            )
        self.forward_model = torch.compile(self.train_module) if t.compile else self.train_module
        if not self.ranks.active:
            self.eval_forward = self.forward_model
        else:
            self.eval_forward = torch.compile(self.model) if t.compile else self.model
        if self.device.type == "cuda":
            peak = device_peak_flops(torch.cuda.get_device_name(self.device), bf16=True)
            # MFU of the run: its tokens/s are global, so the peak is that of all its devices.
            task.info["peak_flops"] = peak * self.ranks.world_size if peak else peak
        named = task.trainable_parameters()
        self.params = [p for _, p in named]
        roles = {name: task.roles[name] for name, _ in named}
        self.optimizer = self.make_optimizer(named, roles)
        self.scheduler = build_scheduler(
            self.optimizer,
            steps=t.steps,
            warmup_steps=t.warmup_steps,
            schedule=t.schedule,
            min_lr_ratio=t.min_lr_ratio,
        )
        if task.train_batches is not None and task.val_batches is not None:
            self.batches, self.val_batches = task.train_batches, task.val_batches
        else:
            self.batches = WindowBatches(task.train_tokens, t.context, t.batch_size, self.spec.seed)
            self.val_batches = validation_batches(task.val_tokens, t.context, t.batch_size, t.eval_batches)
        self.tokens_per_step = t.tokens_per_step
        if t.compile:
            task.info["compile_s"] = self.compile_now()
        if t.fisher_every > 0 and self.ranks.is_main:
            self.fisher = FisherMonitor(
                self.model,
                self.optimizer,
                layers=t.fisher_layers,
                max_layers=DEFAULT_MONITOR_LAYERS,
                window=t.fisher_window,
                report_every=t.fisher_every,
                last_step=t.steps,
            )
        # Once-per-process device start-up, before the peak-memory window and every timed phase.
        self.warmup_s = warmup.warm_up(self.device, self.params, self.fisher)
        self.memory = measure.MemoryPeak(self.device)
        # Dropout and any other in-loop randomness: seeded per run (the caller's RNG is forked) and
        # per rank.
        seed = rank_seed(self.spec.seed, self.ranks.rank)
        torch.manual_seed(seed)
        random.seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    @property
    def sharded(self) -> bool:
        """Each matrix's optimizer state lives on one owner rank (``dykaf.distributed``)."""
        return self.ranks.active and self.task_spec.distributed == "shard"

    def make_optimizer(self, named: list[tuple[str, torch.nn.Parameter]], roles: dict[str, str]) -> Any:
        """The registry optimizer, or in shard mode its sharded form (``dykaf.distributed``)."""
        hyper = dict(self.spec.hyperparameters)
        if not self.sharded:
            return build_optimizer(self.spec.optimizer, named, hyper, roles)
        t = self.task_spec
        # The layers the Fisher diagnostics read are owned by rank 0, which runs them: their "own"
        # factors are then at hand there (the balancing places everything else around them).
        probed = (
            select_layers(self.model, t.fisher_layers, DEFAULT_MONITOR_LAYERS) if t.fisher_every > 0 else []
        )
        return build_sharded_optimizer(
            self.spec.optimizer, named, hyper, roles, pinned=dict.fromkeys(probed, 0)
        )

    def compile_now(self) -> float:
        """Trigger torch.compile's graph capture and code generation with one untimed forward and
        backward pass, so that compilation is not billed to the first training step (and so to
        tokens/s). RNG states are forked and gradients cleared: training is unchanged."""
        began = time.perf_counter()
        inputs, targets = self.batches.batch(0)
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            self.loss(inputs.to(self.device), targets.to(self.device)).backward()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoints --------------------------------------------------------------------------
    def wall_time(self) -> float:
        return self.tracker.wall_offset + time.perf_counter() - self.started

    def save(self) -> None:
        """Checkpoint; the sink is flushed first so no checkpoint is ever ahead of stored metrics."""
        if self.checkpoint_dir is None:
            return
        self.log_finished_fisher(wait=True)
        self.sink.flush()
        if self.ranks.active:
            # Every rank's part first (its RNG, its optimizer shard); rank 0 seals the checkpoint with
            # the main file once all parts are on disk, so a main file always has its parts.
            part = {
                "fingerprint": spec_fingerprint(self.spec),
                "rng": _rng_state(self.device),
                "optimizer": self.optimizer.state_dict() if self.sharded else None,
            }
            ckpt.atomic_torch_save(part, ckpt.part_path(self.checkpoint_dir, self.step, self.ranks.rank))
            self.ranks.barrier()
        if self.ranks.is_main:
            payload = {
                "fingerprint": spec_fingerprint(self.spec),
                "world_size": self.ranks.world_size,
                "step": self.step,
                # Micro-batches of the global stream consumed; batches are a pure function of (seed,
                # position), see lm.data.
                "data_position": self.step * self.micro_batches_per_step,
                "model": self.model.state_dict(),
                "optimizer": None if self.sharded else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(self.device),
                "tracker": {**self.tracker.state(), "wall_offset": self.wall_time()},
                # The probes' gradient windows and shadow factors: without them a resumed run's Fisher
                # rows would restart from scratch and differ from an uninterrupted run's.
                "fisher": self.fisher.state_dict() if self.fisher is not None else None,
            }
            ckpt.save_checkpoint(self.checkpoint_dir, self.step, payload)
        self.ranks.barrier()

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of the global stream one optimizer step consumes (all ranks together)."""
        return self.task_spec.grad_accum * self.ranks.world_size

    def resume(self) -> bool:
        """Load the newest checkpoint if any; True when one was loaded."""
        path = ckpt.latest_checkpoint(self.checkpoint_dir)
        # Every rank resumes from the checkpoint rank 0 found (-1: none), even if one is being
        # written by a previous attempt that is still dying.
        found = self.ranks.broadcast_int(ckpt.checkpoint_step(path) if path is not None else -1)
        if found < 0:
            return False
        assert self.checkpoint_dir is not None
        path = ckpt.checkpoint_path(self.checkpoint_dir, found)
        payload = ckpt.load_checkpoint(path)
        saved_world = int(payload.get("world_size", 1))
        if saved_world != self.ranks.world_size:
            raise ValueError(
                f"checkpoint {path} was written by a {saved_world}-device run and this run has "
                f"{self.ranks.world_size} devices: a run resumes on as many devices as it started "
                "with (its global batch depends on them)"
            )
        if payload.get("fingerprint") != spec_fingerprint(self.spec):
            raise ValueError(f"checkpoint {path} was written by a different run spec; use a fresh directory")
        rng, optimizer_state = payload["rng"], payload["optimizer"]
        if self.ranks.active:
            part_file = ckpt.part_path(self.checkpoint_dir, found, self.ranks.rank)
            if not part_file.is_file():
                raise ValueError(f"checkpoint {path} lacks rank {self.ranks.rank}'s part {part_file.name}")
            part = ckpt.load_checkpoint(part_file)
            rng = part["rng"]
            if self.sharded:
                optimizer_state = part["optimizer"]
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(optimizer_state)
        ckpt.place_nested_state(self.optimizer)
        self.scheduler.load_state_dict(payload["scheduler"])
        _set_rng_state(rng, self.device)
        self.tracker.load(payload["tracker"])
        if self.fisher is not None and payload.get("fisher") is not None:
            self.fisher.load_state_dict(payload["fisher"])
        self.step = int(payload["step"])
        expected = self.step * self.micro_batches_per_step
        if payload.get("data_position", expected) != expected:
            raise ValueError(f"checkpoint {path} has an inconsistent data position")
        log.info("resumed %s from %s (step %d)", self.spec.run_key, path.name, self.step)
        return True

    def export_model(self) -> None:
        """Pre-training runs leave a ``model.pt`` that a fine-tuning task can start from."""
        from worker.lm.hf import EXPORT_NAME, OUR_MODELS, save_gpt_export

        exporting = self.checkpoint_dir is not None and self.ranks.is_main
        if exporting and isinstance(self.model, OUR_MODELS) and self.task is not None:
            save_gpt_export(self.checkpoint_dir / EXPORT_NAME, self.model, self.task.tokenizer)

    # -- the loop -----------------------------------------------------------------------------
    def log_finished_fisher(self, *, wait: bool = False, close: bool = False) -> None:
        """Store the rows of finished Fisher reports; ``wait``/``close`` also wait for a running
        one (``close`` then stops the report thread). Only waiting is timed as diagnostics."""
        fisher = self.fisher
        if fisher is None:
            return
        if close:
            rows, _ = self.timed_diagnostics(fisher.close)
        elif wait:
            rows, _ = self.timed_diagnostics(functools.partial(fisher.finished_reports, True))
        else:
            rows = fisher.finished_reports()
        if rows:
            self.sink.log_fisher(rows)

    def timed_diagnostics(self, work: Callable[[], _T]) -> tuple[_T, float]:
        """Run Fisher-diagnostics ``work``; its (device-synchronised) time goes to ``fisher_total``."""
        began = measure.now(self.device)
        result = work()
        spent = measure.now(self.device) - began
        self.tracker.fisher_total += spent
        return result, spent

    def loss(self, inputs: Any, targets: torch.Tensor, *, evaluating: bool = False) -> torch.Tensor:
        """The task's loss on one micro-batch. Training goes through DDP on several devices;
        evaluation never does (ranks evaluate different numbers of batches, and DDP's forward may
        hold a collective), so it uses the model itself, compiled where training is."""
        assert self.task is not None
        if self.task.loss_fn is not None:
            module = self.model if evaluating else self.train_module
            with self.autocast():
                return self.task.loss_fn(module, inputs, targets)
        module = self.eval_forward if evaluating else self.forward_model
        with self.autocast():
            logits = self.task.logits(module, inputs)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss over the fixed validation batches; on N devices rank r evaluates every
        N-th batch from the r-th and the sums are reduced, so each rank does 1/N of the work."""
        self.model.eval()
        total, count = 0.0, 0
        for index, (inputs, targets) in enumerate(self.val_batches):
            if index % self.ranks.world_size != self.ranks.rank:
                continue
            loss = self.loss(_to_device(inputs, self.device), targets.to(self.device), evaluating=True)
            counted = int((targets != -100).sum())  # instruct: prompt positions carry no loss
            total += float(loss) * counted
            count += counted
        self.model.train()
        total, count = self.ranks.sum(total, count)
        return total / count

    def task_metrics(self) -> dict[str, float]:
        """The task's quality metrics (accuracy, exact match, ...) on its validation data."""
        assert self.task is not None
        if self.task.eval_metrics is None:
            return {}
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                return self.task.eval_metrics(self.model, self.device)
        finally:
            self.model.train()

    def log_eval(self, metrics: dict[str, float]) -> None:
        val = self.evaluate()
        metrics["val_loss"] = val
        if self.task_spec.kind != "classify":  # a perplexity of labels means nothing
            metrics["val_ppl"] = math.exp(val) if val < 700 else math.inf
        if not math.isfinite(val):
            self.sink.log_metrics(self.step, metrics, self.wall_time())
            raise Diverged(f"non-finite validation loss ({val}) at step {self.step}")
        quality = self.task_metrics()
        metrics.update(quality)
        self.tracker.observe_val(self.step, val, quality)

    def train_step(self, log_this: bool) -> dict[str, float]:
        t = self.task_spec
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        start = measure.now(self.device)
        losses = []
        first = (self.step - 1) * self.micro_batches_per_step + self.ranks.rank * t.grad_accum
        for micro in range(t.grad_accum):
            inputs, targets = self.batches.batch(first + micro)
            # DDP averages gradients across ranks in the backward of the last micro-batch only.
            last = micro == t.grad_accum - 1
            syncing = (
                contextlib.nullcontext() if last or not self.ranks.active else self.train_module.no_sync()
            )
            with syncing:
                loss = self.loss(_to_device(inputs, self.device), targets.to(self.device, non_blocking=True))
                (loss / t.grad_accum).backward()
            losses.append(loss.detach())
        train_loss = self.ranks.mean(float(torch.stack(losses).mean()))
        after_backward = measure.now(self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        metrics = {"train_loss": train_loss, "lr": lr}
        if not math.isfinite(train_loss):
            self.sink.log_metrics(self.step, metrics, self.wall_time())
            raise Diverged(f"non-finite training loss ({train_loss}) at step {self.step}")
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        metrics["grad_norm"] = grad_norm
        if not math.isfinite(grad_norm):
            self.sink.log_metrics(self.step, metrics, self.wall_time())
            raise Diverged(f"non-finite gradient norm ({grad_norm}) at step {self.step}")
        before = measure.snapshot(self.params) if log_this else None
        diagnostics = 0.0
        if self.fisher is not None and self.fisher.has_work(self.step):
            # After clipping: the shadow estimators and the Fisher window see exactly the gradient
            # stream the optimizer sees, so "own" and the shadows are comparable (and a DyKAF run's
            # own factors equal its DyKAF shadow's).
            _, diagnostics = self.timed_diagnostics(functools.partial(self.fisher.observe, self.step))
        step_start = measure.now(self.device)
        try:
            self.optimizer.step()
        except torch.linalg.LinAlgError as exc:
            # Matrix optimizers decompose statistics built from the gradients; when a sweep's large
            # lr blows those up the decomposition fails before any loss is non-finite. That is the
            # run diverging, not the worker failing: a sweep should read it as such.
            self.sink.log_metrics(self.step, metrics, self.wall_time())
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Diverged(
                f"the optimizer's linear algebra broke down at step {self.step}: {detail}"
            ) from exc
        self.scheduler.step()
        end = measure.now(self.device)
        fwd_bwd, opt_time = after_backward - start, end - step_start
        step_time = end - start - diagnostics
        self.tracker.fwd_bwd_total += fwd_bwd
        self.tracker.optimizer_total += opt_time
        self.tracker.train_time += step_time
        self.tracker.timed_steps += 1
        self.tracker.tokens_total += self.tokens_per_step
        self.tracker.final_train = train_loss
        metrics.update(
            fwd_bwd_time=fwd_bwd,
            optimizer_time=opt_time,
            step_time=step_time,
            tokens_per_s=self.tokens_per_step / max(step_time, 1e-12),
        )
        if before is not None:
            change = measure.update_norm(before, self.params)
            metrics["update_norm"] = change
            if not math.isfinite(change):
                self.sink.log_metrics(self.step, metrics, self.wall_time())
                raise Diverged(f"non-finite parameter update ({change}) at step {self.step}")
        return metrics

    def train(self) -> RunResult:
        try:
            return self._train()
        finally:
            # A report still running in the background: its rows are stored whatever ended the run.
            self.log_finished_fisher(close=True)

    def _train(self) -> RunResult:
        t = self.task_spec
        self.build()
        resumed = self.resume()
        self.tracker.warmup_total += self.warmup_s  # after resume(), which restores the tracker
        if self.step >= t.steps:
            return self.result(RunStatus.SUCCEEDED, None)
        if not resumed:
            metrics: dict[str, float] = {}
            self.log_eval(metrics)
            metrics["train_time"] = 0.0
            metrics["peak_memory_mb"] = self.tracker.peak_memory_mb = self.memory.sample()
            self.sink.log_metrics(0, metrics, self.wall_time())
        while self.step < t.steps:
            # Rank 0 hears of a cancel (or a shutdown, or a lost run); every rank stops at this step.
            if self.ranks.any(self.ranks.is_main and self.should_cancel()):
                self.save()
                return self.result(RunStatus.CANCELLED, f"cancelled before step {self.step + 1}")
            self.step += 1
            is_eval = self.step % t.eval_every == 0 or self.step == t.steps
            is_log = is_eval or self.step % t.log_every == 0
            metrics = self.train_step(is_log)
            if self.fisher is not None and self.fisher.is_report_step(self.step):
                # On a spare core or a GPU the report runs beside the evaluation and the next
                # steps (dykaf.fisher's background.py); its rows are logged once it is done.
                self.timed_diagnostics(functools.partial(self.fisher.submit_report, self.step))
            if is_eval:
                self.log_eval(metrics)
            self.log_finished_fisher()
            if is_log:
                metrics["train_time"] = self.tracker.train_time
                metrics["fisher_time"] = self.tracker.fisher_total
                metrics["peak_memory_mb"] = self.tracker.peak_memory_mb = self.memory.sample()
                self.sink.log_metrics(self.step, metrics, self.wall_time())
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save()
            if self.progress is not None:
                self.progress(self.step, t.steps, metrics)
        self.log_finished_fisher(close=True)
        self.save()
        self.export_model()
        return self.result(RunStatus.SUCCEEDED, None)

    def result(self, status: RunStatus, reason: str | None) -> RunResult:
        info = self.task.info if self.task is not None else {}
        summary = self.tracker.summary(self.step, self.wall_time(), info)
        return RunResult(status=status, reason=reason, final_step=self.step, summary=summary)


def execute_run(
    spec: RunSpec,
    sink: MetricSink,
    *,
    checkpoint_dir: str | Path | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    ranks: Ranks | None = None,
) -> RunResult:
    """Train one run to completion, divergence, cancellation or failure; never raises ``Exception``.

    Resumes from the newest checkpoint in ``checkpoint_dir`` when there is one (and checkpoints there
    every ``task.checkpoint_every`` steps, on cancel and at the end). ``device`` overrides the spec's
    preference. ``progress(step, total, metrics)`` is called after every step. The sink is flushed
    but not closed: it belongs to the caller.

    ``ranks``: this process's place in a multi-device run (``worker.distributed`` starts the
    processes and joins the group); every rank calls this with the same spec, rank 0 with the real
    sink and ``should_cancel``, the others with a ``NullSink``. None: a single-device run.
    """
    ranks = ranks or Ranks()
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    run: _Run | None = None
    try:
        target = (
            ranks.device if ranks.active else resolve_device(device if device is not None else spec.device)
        )
        run = _Run(spec, sink, target, directory, should_cancel, progress, ranks)
        fork_devices = [target.index or 0] if target.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            return run.train()
    except Diverged as exc:
        assert run is not None
        log.warning("run %s diverged: %s", spec.run_key, exc)
        result = run.result(RunStatus.DIVERGED, str(exc))
        result.summary["diverged_step"] = float(run.step)
        return result
    except Exception as exc:
        log.exception("run %s failed", spec.run_key)
        reason = f"{type(exc).__name__}: {exc}"
        if run is None:
            return RunResult(status=RunStatus.FAILED, reason=reason, final_step=0)
        return run.result(RunStatus.FAILED, reason)
    finally:
        with contextlib.suppress(Exception):
            sink.flush()
        if run is not None and run.device.type == "cuda":
            del run
            torch.cuda.empty_cache()
