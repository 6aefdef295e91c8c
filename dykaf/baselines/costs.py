"""What one optimizer step costs per parameter, relative to the other parameters of the same optimizer.

A sharded step (``dykaf.distributed``) gives each parameter one owner rank and balances the ranks
by these costs, so only their ratios matter: each is the leading term of the per-step work (the
factor updates and preconditioning products; an eigenbasis refresh every few steps scales the same
way), in multiply-adds, and it follows the routing each registry entry applies (``roles.py``,
``registry.py``), so a parameter an entry hands to AdamW costs what AdamW costs.

* the DyKAF engine (DyKAF, SOAP): the matrix ``m × n`` the engine preconditions
  (``dykaf.optimizer.matrix_shape``) costs ``m·n·(m' + n')``, where a side counts only if it is
  within ``max_precond_dim`` (the engine gives a longer side no factor); with no factor at all, or
  run as plain Adam, ``numel``;
* Shampoo: a tensor it takes (every side within ``max_precond_dim``) costs
  ``numel · Σ min(side, block_size)`` (the library splits long sides into blocks); the rest runs
  AdamW: ``numel``;
* Muon: a hidden matrix costs ``m·n·min(m, n)`` (Newton–Schulz products); the rest runs AdamW;
* PSGD Kron: ``numel · Σ side`` over the sides within ``max_size_triangular``;
* elementwise optimizers (AdamW, Adafactor): ``numel``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from dykaf.baselines import roles as role_names
from dykaf.optimizer import factored_sides, matrix_shape


def elementwise(config: Any, name: str, param: Tensor, role: str) -> float:
    """AdamW, Adafactor and every parameter an entry routes to AdamW: one pass over the tensor."""
    return float(param.numel())


def engine(config: Any, name: str, param: Tensor, role: str) -> float:
    """The DyKAF engine's step (``dykaf.optimizer``): factor sides within ``max_precond_dim``."""
    shape = matrix_shape(param, config.precondition_1d)
    if shape is None:
        return float(param.numel())
    rows, cols = shape
    left, right = factored_sides(shape, config.max_precond_dim)
    sides = rows * left + cols * right
    return float(rows * cols * sides) if sides else float(rows * cols)


def shampoo_takes(param: Tensor, max_precond_dim: int) -> bool:
    """The registry's Shampoo routing: tensors of two or more dimensions whose every side fits
    ``max_precond_dim`` go to ``ScalableShampoo``, the rest to AdamW (shared with its builder)."""
    return param.ndim >= 2 and max(param.shape) <= max_precond_dim


def shampoo(config: Any, name: str, param: Tensor, role: str) -> float:
    """``ScalableShampoo`` on tensors whose every side fits ``max_precond_dim``, in blocks."""
    if shampoo_takes(param, config.max_precond_dim):
        return float(param.numel() * sum(min(side, config.block_size) for side in param.shape))
    return float(param.numel())


def muon(config: Any, name: str, param: Tensor, role: str) -> float:
    """Muon's Newton–Schulz iterations on hidden matrices; AdamW elsewhere."""
    if role == role_names.HIDDEN and param.ndim == 2:
        rows, cols = param.shape
        return float(rows * cols * min(rows, cols))
    return float(param.numel())


def psgd_kron(config: Any, name: str, param: Tensor, role: str) -> float:
    """PSGD Kron: a triangular factor for every side within ``max_size_triangular``."""
    sides = sum(side for side in param.shape if side <= config.max_size_triangular)
    return float(math.prod(param.shape) * sides) if sides else float(param.numel())
