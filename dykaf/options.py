"""Hyperparameter defaults and validation for the DyKAF engine.

Validation lives in one function used both at construction and by ``add_param_group`` so that a bad
value in any param group is caught before the first step, with a message that names the argument
and the values it accepts (the registry and the REST API surface these messages verbatim).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dykaf.kronecker import FACTOR_RULES, INIT_RULES

SECOND_MOMENTS: tuple[str, ...] = ("full", "rank1")

DEFAULTS: dict[str, Any] = {
    "lr": 3e-3,
    "betas": (0.95, 0.95),
    "shampoo_beta": None,
    "eps": 1e-8,
    "weight_decay": 0.01,
    "precondition_frequency": 10,
    "max_precond_dim": 10000,
    "factor_rule": "parallel",
    "second_moment": "full",
    "init": "kron",
    "precondition_1d": False,
}


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _in_unit_interval(name: str, value: Any) -> None:
    number = _finite_number(name, value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def validate_hyperparameters(group: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of a param group."""
    if _finite_number("lr", group["lr"]) < 0:
        raise ValueError(f"lr must be >= 0, got {group['lr']!r}")
    betas = group["betas"]
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2) with each in [0, 1), got {betas!r}")
    _in_unit_interval("betas[0]", betas[0])
    _in_unit_interval("betas[1]", betas[1])
    if group["shampoo_beta"] is not None:
        _in_unit_interval("shampoo_beta", group["shampoo_beta"])
    if _finite_number("eps", group["eps"]) <= 0:
        raise ValueError(f"eps must be > 0, got {group['eps']!r}")
    if _finite_number("weight_decay", group["weight_decay"]) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")
    _positive_int("precondition_frequency", group["precondition_frequency"])
    max_dim = group["max_precond_dim"]
    if isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 0:
        raise ValueError(f"max_precond_dim must be an integer >= 0, got {max_dim!r}")
    _choice("factor_rule", group["factor_rule"], FACTOR_RULES)
    _choice("second_moment", group["second_moment"], SECOND_MOMENTS)
    _choice("init", group["init"], INIT_RULES)
    if not isinstance(group["precondition_1d"], bool):
        raise ValueError(f"precondition_1d must be true or false, got {group['precondition_1d']!r}")


def factor_beta(group: Mapping[str, Any]) -> float:
    """The factor decay β: ``shampoo_beta`` when set, else ``β2`` (the public code's default)."""
    beta = group["shampoo_beta"]
    return float(group["betas"][1] if beta is None else beta)
