"""The DyKAF engine's hyperparameters: one validated config, :class:`DyKAFConfig`.

``DyKAF(params, lr=..., betas=..., ...)`` keeps torch's keyword arguments and param-group dicts;
every group (at construction and in ``add_param_group``) is checked by building a ``DyKAFConfig``
from it, so a bad value in any group is refused before the first step with a message naming the
argument and its range. The registry serves the same config's schema to the REST API and the
dashboard (``dykaf.baselines.registry``), so the library and the service accept the same values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from dykaf.config import (
    HyperparameterError,
    OptimizerConfig,
    decay,
    decoupled_weight_decay,
    epsilon,
    hyperparameter,
    learning_rate,
)
from dykaf.kronecker import FactorRule, InitRule

SecondMoment = Literal["full", "rank1"]
SECOND_MOMENTS: tuple[str, ...] = get_args(SecondMoment)


@dataclass(frozen=True, kw_only=True)
class DyKAFConfig(OptimizerConfig):
    """DyKAF's and SOAP's hyperparameters (defaults: the authors' public code; see dykaf/docs/math.md)."""

    lr: float = learning_rate(3e-3)
    beta1: float = decay(0.95, "first-moment decay β1")
    beta2: float = decay(0.95, "second-moment decay β2")
    shampoo_beta: float | None = decay(None, "factor decay β (null: β2)")
    eps: float = epsilon(1e-8)
    weight_decay: float = decoupled_weight_decay(0.01)
    precondition_frequency: int = hyperparameter(
        10, "steps between eigenbasis refreshes", minimum=1, maximum=100000
    )
    max_precond_dim: int = hyperparameter(
        10000, "sides longer than this get no factor (identity rotation)", minimum=0, maximum=65536
    )
    precondition_1d: bool = hyperparameter(False, "precondition 1-D params instead of Adam")
    factor_rule: FactorRule = hyperparameter(
        "parallel", "factor update: projector splitting (parallel, sequential) or SOAP's EMA (ema)"
    )
    second_moment: SecondMoment = hyperparameter(
        "full", "Adam's second moment in the eigenbasis: full, or rank1 (no m×n buffer)"
    )
    init: InitRule = hyperparameter("kron", "factor initialisation of the projector-splitting rules")

    def as_kwargs(self) -> dict[str, Any]:
        """``DyKAF``'s keyword arguments (``betas`` as a pair), i.e. its param-group defaults."""
        values = self.as_dict()
        values["betas"] = (values.pop("beta1"), values.pop("beta2"))
        return values

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> DyKAFConfig:
        """Validate a param group (keys as ``DyKAF``'s keyword arguments; others, such as ``params``
        or a scheduler's ``initial_lr``, are ignored). Errors name ``betas[0]``, not ``beta1``."""
        betas = group["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise HyperparameterError("betas", "a pair (beta1, beta2), each >= 0 and < 1", betas)
        names = set(cls.hyperparameters()) - {"beta1", "beta2"}
        try:
            return cls(beta1=betas[0], beta2=betas[1], **{k: group[k] for k in names})
        except HyperparameterError as error:
            raise error.renamed({"beta1": "betas[0]", "beta2": "betas[1]"}) from None


# DyKAF's keyword defaults, derived from the config so they cannot drift from it.
DEFAULTS: dict[str, Any] = DyKAFConfig().as_kwargs()


def factor_beta(group: Mapping[str, Any]) -> float:
    """The factor decay β of a param group (or of ``DyKAFConfig.as_kwargs()``): ``shampoo_beta`` when
    set, else ``β2`` (the public code's default). Read from the group at every step."""
    beta = group["shampoo_beta"]
    return float(group["betas"][1] if beta is None else beta)
