"""Checkpoints written atomically (temporary file in the same directory, fsync, ``os.replace``), so a
crash mid-write never leaves a truncated file where the resume logic would find it.

A run on several devices writes, per checkpoint, one part per rank (``step-XXXXXXXX.rank-R.pt``:
its RNG state and, when the optimizer is sharded, its optimizer shard) and then the main file, which
rank 0 writes only once every part is on disk: a main file found means a complete checkpoint.

Checkpoint directories belong to the worker (never named by a user's spec), which is why loading
falls back to full unpickling for optimizer states that hold non-tensor objects.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
_PART = re.compile(r"^step-(\d{8,})\.rank-\d+\.pt$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file and, when it is the cause,
    that the disk is full (torch's own error for a short write is an opaque
    "enforce fail at inline_container.cc ... unexpected pos")."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that readers see either the old file or the complete new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(target, obj, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(target: Path, obj: Any, exc: Exception) -> CheckpointWriteError:
    need = _tensor_bytes(obj)
    try:
        free = shutil.disk_usage(target.parent).free
    except OSError:
        free = None
    mib = 1024 * 1024
    if (free is not None and free < need) or getattr(exc, "errno", None) == errno.ENOSPC:
        free_text = "unknown" if free is None else f"{free / mib:.1f} MiB"
        return CheckpointWriteError(
            errno.ENOSPC,
            f"could not write checkpoint {target}: no space left on device "
            f"(it needs about {need / mib:.1f} MiB, {free_text} free in {target.parent})",
        )
    return CheckpointWriteError(
        errno.EIO, f"could not write checkpoint {target}: {type(exc).__name__}: {exc}"
    )


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint payload (the bulk of what ``torch.save`` writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def part_path(directory: Path, step: int, rank: int) -> Path:
    """One rank's part of the checkpoint of ``step`` (multi-device runs)."""
    return directory / f"step-{step:08d}.rank-{rank}.pt"


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint file")
    return int(match.group(1))


def list_checkpoints(directory: str | Path | None) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in ``directory``, oldest first."""
    if directory is None or not Path(directory).is_dir():
        return []
    found = []
    for entry in Path(directory).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: str | Path | None) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: str | Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step-XXXXXXXX.pt`` and delete all but the newest ``keep`` checkpoints."""
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    atomic_torch_save(payload, path)
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    kept = {found for found, _ in list_checkpoints(directory)}
    for entry in directory.iterdir():
        match = _PART.match(entry.name)
        if match and int(match.group(1)) not in kept and int(match.group(1)) < step:
            entry.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Registry optimizers may keep small Python objects in their state; the file is ours.
        return torch.load(path, map_location="cpu", weights_only=False)


def place_nested_state(optimizer: torch.optim.Optimizer) -> int:
    """Move tensors kept *inside Python objects* of an optimizer's state onto their parameter's
    device; returns how many moved.

    ``Optimizer.load_state_dict`` moves a state's own tensors to the parameter's device, but not
    the tensors a library keeps in its own objects there (pytorch-optimizer's Shampoo keeps its
    statistics and inverse roots in ``PreConditioner`` and ``Graft`` objects). A checkpoint is
    loaded with ``map_location="cpu"``, so without this a GPU run resumed from one would fail at its
    first step with tensors on two devices.
    """
    moved = 0
    for param, state in optimizer.state.items():
        for value in state.values():
            moved += _place_attributes(value, param.device, depth=0)
    return moved


def _place_attributes(value: Any, device: torch.device, depth: int) -> int:
    """Tensors in ``value``'s attributes (and in lists/tuples/nested objects there) → ``device``."""
    if depth > 4 or isinstance(value, (torch.Tensor, dict, list, tuple, str, bytes, type)):
        return 0
    attributes = getattr(value, "__dict__", None)
    if not attributes:
        return 0
    moved = 0
    for name, attr in list(attributes.items()):
        if isinstance(attr, torch.Tensor):
            if attr.device != device:
                setattr(value, name, attr.to(device))
                moved += 1
        elif isinstance(attr, (list, tuple)):
            placed = [t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t for t in attr]
            changed = sum(a is not b for a, b in zip(placed, attr, strict=True))
            if changed:
                setattr(value, name, tuple(placed) if isinstance(attr, tuple) else placed)
            moved += changed + sum(_place_attributes(item, device, depth + 1) for item in attr)
        else:
            moved += _place_attributes(attr, device, depth + 1)
    return moved
