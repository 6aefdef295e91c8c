"""The baselines' hyperparameters: one validated config per optimizer (see :mod:`dykaf.config`).

Defaults follow each library's own defaults or common practice for GPT-style pre-training; the
ranges are those of the library's arguments, capped where a larger value is a slip, not a setting.
Muon and Shampoo run AdamW on the parameters they do not take (``dykaf/baselines/README.md``); its
hyperparameters are the ``adamw_*`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from dykaf.config import (
    OptimizerConfig,
    decay,
    decoupled_weight_decay,
    epsilon,
    hyperparameter,
    learning_rate,
)

Graft = Literal["rmsprop", "adagrad", "sgd", "none"]
GRAFTS: tuple[str, ...] = get_args(Graft)  # pytorch-optimizer's LayerWiseGrafting member names, lower-case


@dataclass(frozen=True, kw_only=True)
class AdamWConfig(OptimizerConfig):
    """``torch.optim.AdamW``."""

    lr: float = learning_rate(3e-3)
    beta1: float = decay(0.9, "first-moment decay β1")
    beta2: float = decay(0.95, "second-moment decay β2")
    eps: float = epsilon(1e-8)
    weight_decay: float = decoupled_weight_decay(0.01)


@dataclass(frozen=True, kw_only=True)
class AdafactorConfig(OptimizerConfig):
    """``torch.optim.Adafactor``."""

    lr: float = learning_rate(1e-2)
    beta2_decay: float = hyperparameter(-0.8, "second-moment decay exponent", minimum=-1, maximum=0)
    eps2: float = hyperparameter(1e-3, "relative step epsilon", exclusive_minimum=0, maximum=1)
    clip_threshold: float = hyperparameter(1.0, "update clipping threshold d", exclusive_minimum=0)
    weight_decay: float = decoupled_weight_decay(0.0)


_SIDE = "for embeddings, head and 1-D params"


@dataclass(frozen=True, kw_only=True)
class MuonConfig(OptimizerConfig):
    """``torch.optim.Muon`` on hidden matrices; AdamW (the ``adamw_*`` fields) on the rest."""

    lr: float = learning_rate(0.02)
    momentum: float = decay(0.95, "momentum")
    nesterov: bool = hyperparameter(True, "Nesterov momentum")
    ns_steps: int = hyperparameter(5, "Newton–Schulz iterations", minimum=1, maximum=20)
    weight_decay: float = decoupled_weight_decay(0.01)
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = hyperparameter(
        "original", "learning-rate shape scaling"
    )
    adamw_lr: float = learning_rate(3e-3)
    adamw_beta1: float = decay(0.9, f"AdamW β1 {_SIDE}")
    adamw_beta2: float = decay(0.95, f"AdamW β2 {_SIDE}")
    adamw_eps: float = epsilon(1e-8)
    adamw_weight_decay: float = decoupled_weight_decay(0.01)


@dataclass(frozen=True, kw_only=True)
class ShampooConfig(OptimizerConfig):
    """pytorch-optimizer's ``ScalableShampoo`` with grafting on matrices within ``max_precond_dim``;
    AdamW (the ``adamw_*`` fields) on the rest."""

    lr: float = learning_rate(3e-3)
    beta1: float = decay(0.95, "momentum β1 (an EMA, with Nesterov)")
    beta2: float = decay(0.95, "decay of the Kronecker statistics and of the graft's second moment")
    weight_decay: float = decoupled_weight_decay(0.01)
    precondition_frequency: int = hyperparameter(
        10, "steps between inverse-root recomputations", minimum=1, maximum=100000
    )
    start_preconditioning_step: int = hyperparameter(
        25, "steps of grafted RMSProp before Shampoo's direction is used", minimum=1
    )
    block_size: int = hyperparameter(
        512, "sides longer than this are split into blocks", minimum=2, maximum=65536
    )
    inverse_root: int = hyperparameter(
        0,
        "p in L^(-1/p) G R^(-1/p); 0: twice the tensor order (4 for a matrix, the library's "
        "default); 2 is the power-1/2 variant of Anil et al. 2020",
        minimum=0,
        maximum=16,
    )
    graft: Graft = hyperparameter("rmsprop", "layer-wise update size taken from")
    nesterov: bool = hyperparameter(True, "Nesterov momentum")
    matrix_eps: float = hyperparameter(1e-6, "damping of the factors", exclusive_minimum=0)
    max_precond_dim: int = hyperparameter(4096, "larger matrices go to AdamW", minimum=1, maximum=65536)
    adamw_lr: float = learning_rate(3e-3)
    adamw_beta1: float = decay(0.9, f"AdamW β1 {_SIDE}")
    adamw_beta2: float = decay(0.95, f"AdamW β2 {_SIDE}")
    adamw_eps: float = epsilon(1e-8)
    adamw_weight_decay: float = decoupled_weight_decay(0.01)


@dataclass(frozen=True, kw_only=True)
class PSGDKronConfig(OptimizerConfig):
    """pytorch-optimizer's ``Kron`` (PSGD with Kronecker-factored preconditioners)."""

    lr: float = learning_rate(3e-4)
    momentum: float = decay(0.9, "momentum")
    weight_decay: float = decoupled_weight_decay(0.0)
    max_size_triangular: int = hyperparameter(8192, "larger sides use a diagonal preconditioner", minimum=1)
    preconditioner_update_probability: float = hyperparameter(
        0.1, "probability of a preconditioner update per step", exclusive_minimum=0, maximum=1
    )
