"""Every optimizer the service can run, by name, with a hyperparameter schema.

The schema (type, default, range, help) is what the REST API validates against and what the
dashboard renders as a form, so it is data, not code. Baselines come from well-kept libraries:
``torch.optim`` (AdamW, Adafactor, Muon) and ``pytorch-optimizer`` (grafted ScalableShampoo, PSGD Kron); only
DyKAF and SOAP (one engine) are written here.

Routing follows practice: Muon takes hidden 2-D matrices and AdamW the embeddings, head and 1-D
params; Shampoo takes matrices whose every side fits ``max_precond_dim`` and AdamW the rest; the
DyKAF engine runs 1-D params as Adam itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from dykaf import roles as role_names
from dykaf.optimizer import DyKAF
from dykaf.roles import resolve_roles
from dykaf.routed import RoutedOptimizer


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter's schema entry (JSON-schema-like, rendered by the dashboard)."""

    type: str  # "number" | "integer" | "boolean" | "string"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    enum: tuple[str, ...] | None = None
    log_scale: bool = False
    nullable: bool = False

    def as_schema(self) -> dict[str, Any]:
        schema = {k: v for k, v in asdict(self).items() if v is not None and v is not False}
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        schema.setdefault("default", self.default)
        return schema

    def check(self, name: str, value: Any) -> Any:
        """Return the value (ints promoted for numbers) or raise ``ValueError`` naming ``name``."""
        if value is None and self.nullable:
            return None
        if self.type == "boolean":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            return value
        if self.type == "string":
            if value not in (self.enum or ()):
                raise ValueError(
                    f"{name} must be one of {', '.join(map(repr, self.enum or ()))}; got {value!r}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a {self.type}, got {value!r}")
        if self.type == "integer" and not (isinstance(value, int) or float(value).is_integer()):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        value = int(value) if self.type == "integer" else float(value)
        self._check_range(name, value)
        return value

    def _check_range(self, name: str, value: float) -> None:
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.exclusive_minimum is not None:
            bounds.append(f"> {self.exclusive_minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        if self.exclusive_maximum is not None:
            bounds.append(f"< {self.exclusive_maximum:g}")
        ok = (
            (self.minimum is None or value >= self.minimum)
            and (self.exclusive_minimum is None or value > self.exclusive_minimum)
            and (self.maximum is None or value <= self.maximum)
            and (self.exclusive_maximum is None or value < self.exclusive_maximum)
        )
        if not ok:
            raise ValueError(f"{name} must be {' and '.join(bounds)}, got {value!r}")


def _lr(default: float) -> Hyperparameter:
    return Hyperparameter("number", default, "learning rate", exclusive_minimum=0, maximum=10, log_scale=True)


def _beta(default: float, what: str) -> Hyperparameter:
    return Hyperparameter("number", default, what, minimum=0, exclusive_maximum=1)


def _weight_decay(default: float) -> Hyperparameter:
    return Hyperparameter("number", default, "decoupled weight decay", minimum=0, maximum=1)


_EPS = Hyperparameter("number", 1e-8, "Adam's epsilon", exclusive_minimum=0, maximum=1, log_scale=True)

_ENGINE_COMMON: dict[str, Hyperparameter] = {
    "lr": _lr(3e-3),
    "beta1": _beta(0.95, "first-moment decay β1"),
    "beta2": _beta(0.95, "second-moment decay β2"),
    "shampoo_beta": Hyperparameter(
        "number", None, "factor decay β (null: β2)", minimum=0, exclusive_maximum=1, nullable=True
    ),
    "eps": _EPS,
    "weight_decay": _weight_decay(0.01),
    "precondition_frequency": Hyperparameter(
        "integer", 10, "steps between eigenbasis refreshes", minimum=1, maximum=100000
    ),
    "max_precond_dim": Hyperparameter(
        "integer", 10000, "sides longer than this get no factor (identity rotation)", minimum=0, maximum=65536
    ),
    "precondition_1d": Hyperparameter("boolean", False, "precondition 1-D params instead of Adam"),
}
_INIT = Hyperparameter("string", "kron", "factor initialisation", enum=("kron", "eps"))


@dataclass(frozen=True)
class OptimizerEntry:
    """A registry entry: schema plus a builder taking resolved ``(name, param, role)`` triples."""

    name: str
    description: str
    source: str
    hyperparameters: Mapping[str, Hyperparameter]
    build: Callable[[list[tuple[str, Tensor, str]], dict[str, Any]], Optimizer]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "hyperparameters": {k: h.as_schema() for k, h in self.hyperparameters.items()},
        }


def _params(triples: list[tuple[str, Tensor, str]]) -> list[Tensor]:
    return [p for _, p, _ in triples]


def _engine_builder(**fixed: Any) -> Callable[[list[tuple[str, Tensor, str]], dict[str, Any]], Optimizer]:
    def build(triples: list[tuple[str, Tensor, str]], hp: dict[str, Any]) -> Optimizer:
        kwargs = dict(hp)
        kwargs["betas"] = (kwargs.pop("beta1"), kwargs.pop("beta2"))
        return DyKAF(_params(triples), **kwargs, **fixed)

    return build


def _adamw(params: list[Tensor], lr: float, beta1: float, beta2: float, eps: float, wd: float) -> Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)


def _build_adamw(triples: list[tuple[str, Tensor, str]], hp: dict[str, Any]) -> Optimizer:
    return _adamw(_params(triples), hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"])


def _build_adafactor(triples: list[tuple[str, Tensor, str]], hp: dict[str, Any]) -> Optimizer:
    return torch.optim.Adafactor(
        _params(triples),
        lr=hp["lr"],
        beta2_decay=hp["beta2_decay"],
        eps=(None, hp["eps2"]),
        d=hp["clip_threshold"],
        weight_decay=hp["weight_decay"],
    )


def _routed(
    primary_name: str,
    primary: list[Tensor],
    rest: list[Tensor],
    make_primary: Callable[[list[Tensor]], Optimizer],
    hp: dict[str, Any],
) -> Optimizer:
    parts: dict[str, Optimizer] = {}
    if primary:
        parts[primary_name] = make_primary(primary)
    if rest:
        parts["adamw"] = _adamw(
            rest,
            hp["adamw_lr"],
            hp["adamw_beta1"],
            hp["adamw_beta2"],
            hp["adamw_eps"],
            hp["adamw_weight_decay"],
        )
    return RoutedOptimizer(parts)


def _build_muon(triples: list[tuple[str, Tensor, str]], hp: dict[str, Any]) -> Optimizer:
    hidden = [p for _, p, role in triples if role == role_names.HIDDEN and p.ndim == 2]
    rest = [p for _, p, role in triples if not (role == role_names.HIDDEN and p.ndim == 2)]

    def make(params: list[Tensor]) -> Optimizer:
        return torch.optim.Muon(
            params,
            lr=hp["lr"],
            weight_decay=hp["weight_decay"],
            momentum=hp["momentum"],
            nesterov=hp["nesterov"],
            ns_steps=hp["ns_steps"],
            adjust_lr_fn=hp["adjust_lr_fn"],
        )

    return _routed("muon", hidden, rest, make, hp)


GRAFTS = ("rmsprop", "adagrad", "sgd", "none")


def _build_shampoo(triples: list[tuple[str, Tensor, str]], hp: dict[str, Any]) -> Optimizer:
    """Shampoo as practitioners run it: pytorch-optimizer's ``ScalableShampoo`` (a port of Google's
    scalable_shampoo), i.e. EMA Kronecker statistics with inverse roots every few steps, blocked
    large sides, Nesterov momentum and layer-wise grafting. Grafting (Agarwal et al. 2020) takes each
    layer's update *direction* from Shampoo and its *size* from RMSProp, which is what makes Shampoo
    competitive with Adam in practice; the library's plain ``Shampoo`` (the 2018 AdaGrad-sum version
    without grafting) reached only 4.58 where AdamW reached 2.36 on the convergence task, so it would
    make a straw-man baseline."""
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    from dykaf.shampoo_state import shampoo_class

    limit = hp["max_precond_dim"]
    fits = [p for _, p, _ in triples if p.ndim >= 2 and max(p.shape) <= limit]
    rest = [p for _, p, _ in triples if not (p.ndim >= 2 and max(p.shape) <= limit)]
    graft = LayerWiseGrafting[hp["graft"].upper()]  # GRAFTS are the enum's member names

    def make(params: list[Tensor]) -> Optimizer:
        optimizer = shampoo_class()(
            params,
            lr=hp["lr"],
            betas=(hp["beta1"], hp["beta2"]),
            moving_average_for_momentum=True,  # an EMA like Adam's β1, so lr means what it means there
            weight_decay=hp["weight_decay"],
            decoupled_weight_decay=True,
            start_preconditioning_step=hp["start_preconditioning_step"],
            preconditioning_compute_steps=hp["precondition_frequency"],
            block_size=hp["block_size"],
            # Off: the library would otherwise flatten any matrix with ≤ block_size entries into a
            # vector and run grafted RMSProp on it; Shampoo preconditions every matrix as a matrix.
            shape_interpretation=False,
            inverse_exponent_override=hp["inverse_root"],
            graft_type=graft,
            nesterov=hp["nesterov"],
            matrix_eps=hp["matrix_eps"],
        )
        # The group key the Fisher probes read as "this optimizer's Kronecker-factor decay"
        # (dykaf.fisher.monitor.optimizer_beta), as on DyKAF/SOAP groups; the library ignores it.
        for group in optimizer.param_groups:
            group["shampoo_beta"] = hp["beta2"]
        return optimizer

    return _routed("shampoo", fits, rest, make, hp)


def _build_psgd_kron(triples: list[tuple[str, Tensor, str]], hp: dict[str, Any]) -> Optimizer:
    from pytorch_optimizer import Kron

    return Kron(
        _params(triples),
        lr=hp["lr"],
        momentum=hp["momentum"],
        weight_decay=hp["weight_decay"],
        max_size_triangular=hp["max_size_triangular"],
        pre_conditioner_update_probability=hp["preconditioner_update_probability"],
    )


_ADAMW_SIDE: dict[str, Hyperparameter] = {
    "adamw_lr": _lr(3e-3),
    "adamw_beta1": _beta(0.9, "AdamW β1 for embeddings, head and 1-D params"),
    "adamw_beta2": _beta(0.95, "AdamW β2 for embeddings, head and 1-D params"),
    "adamw_eps": _EPS,
    "adamw_weight_decay": _weight_decay(0.01),
}

_ENTRIES: list[OptimizerEntry] = [
    OptimizerEntry(
        "dykaf",
        "DyKAF: projector-splitting (parallel) Kronecker factors of the Fisher, Adam in their eigenbasis",
        "dykaf",
        {**_ENGINE_COMMON, "init": _INIT},
        _engine_builder(factor_rule="parallel", second_moment="full"),
    ),
    OptimizerEntry(
        "dykaf-seq",
        "DyKAF with the sequential (Lubich–Oseledets KSL) projector-splitting factor update",
        "dykaf",
        {**_ENGINE_COMMON, "init": _INIT},
        _engine_builder(factor_rule="sequential", second_moment="full"),
    ),
    OptimizerEntry(
        "dykaf-rank1",
        "DyKAF with a rank-1 second moment (no m×n buffer: memory saver)",
        "dykaf",
        {**_ENGINE_COMMON, "init": _INIT},
        _engine_builder(factor_rule="parallel", second_moment="rank1"),
    ),
    OptimizerEntry(
        "soap",
        "SOAP: Shampoo's EMA factors, Adam in their eigenbasis (the DyKAF engine with factor_rule=ema)",
        "dykaf",
        dict(_ENGINE_COMMON),
        _engine_builder(factor_rule="ema", second_moment="full"),
    ),
    OptimizerEntry(
        "adamw",
        "AdamW (torch.optim.AdamW)",
        "torch.optim",
        {
            "lr": _lr(3e-3),
            "beta1": _beta(0.9, "first-moment decay β1"),
            "beta2": _beta(0.95, "second-moment decay β2"),
            "eps": _EPS,
            "weight_decay": _weight_decay(0.01),
        },
        _build_adamw,
    ),
    OptimizerEntry(
        "adafactor",
        "Adafactor (torch.optim.Adafactor)",
        "torch.optim",
        {
            "lr": _lr(1e-2),
            "beta2_decay": Hyperparameter(
                "number", -0.8, "second-moment decay exponent", minimum=-1, maximum=0
            ),
            "eps2": Hyperparameter("number", 1e-3, "relative step epsilon", exclusive_minimum=0, maximum=1),
            "clip_threshold": Hyperparameter(
                "number", 1.0, "update clipping threshold d", exclusive_minimum=0
            ),
            "weight_decay": _weight_decay(0.0),
        },
        _build_adafactor,
    ),
    OptimizerEntry(
        "muon",
        "Muon (torch.optim.Muon) on hidden matrices, AdamW on embeddings, head and 1-D params",
        "torch.optim",
        {
            "lr": _lr(0.02),
            "momentum": _beta(0.95, "momentum"),
            "nesterov": Hyperparameter("boolean", True, "Nesterov momentum"),
            "ns_steps": Hyperparameter("integer", 5, "Newton–Schulz iterations", minimum=1, maximum=20),
            "weight_decay": _weight_decay(0.01),
            "adjust_lr_fn": Hyperparameter(
                "string", "original", "learning-rate shape scaling", enum=("original", "match_rms_adamw")
            ),
            **_ADAMW_SIDE,
        },
        _build_muon,
    ),
    OptimizerEntry(
        "shampoo",
        "Shampoo with RMSProp grafting (pytorch-optimizer's ScalableShampoo) on matrices within "
        "max_precond_dim, AdamW on the rest",
        "pytorch-optimizer",
        {
            "lr": _lr(3e-3),
            "beta1": _beta(0.95, "momentum β1 (an EMA, with Nesterov)"),
            "beta2": _beta(0.95, "decay of the Kronecker statistics and of the graft's second moment"),
            "weight_decay": _weight_decay(0.01),
            "precondition_frequency": Hyperparameter(
                "integer", 10, "steps between inverse-root recomputations", minimum=1, maximum=100000
            ),
            "start_preconditioning_step": Hyperparameter(
                "integer", 25, "steps of grafted RMSProp before Shampoo's direction is used", minimum=1
            ),
            "block_size": Hyperparameter(
                "integer", 512, "sides longer than this are split into blocks", minimum=2, maximum=65536
            ),
            "inverse_root": Hyperparameter(
                "integer",
                0,
                "p in L^(-1/p) G R^(-1/p); 0: twice the tensor order (4 for a matrix, the library's "
                "default); 2 is the power-1/2 variant of Anil et al. 2020",
                minimum=0,
                maximum=16,
            ),
            "graft": Hyperparameter("string", "rmsprop", "layer-wise update size taken from", enum=GRAFTS),
            "nesterov": Hyperparameter("boolean", True, "Nesterov momentum"),
            "matrix_eps": Hyperparameter("number", 1e-6, "damping of the factors", exclusive_minimum=0),
            "max_precond_dim": Hyperparameter(
                "integer", 4096, "larger matrices go to AdamW", minimum=1, maximum=65536
            ),
            **_ADAMW_SIDE,
        },
        _build_shampoo,
    ),
    OptimizerEntry(
        "psgd-kron",
        "PSGD Kron (pytorch-optimizer)",
        "pytorch-optimizer",
        {
            "lr": _lr(3e-4),
            "momentum": _beta(0.9, "momentum"),
            "weight_decay": _weight_decay(0.0),
            "max_size_triangular": Hyperparameter(
                "integer", 8192, "larger sides use a diagonal preconditioner", minimum=1
            ),
            "preconditioner_update_probability": Hyperparameter(
                "number",
                0.1,
                "probability of a preconditioner update per step",
                exclusive_minimum=0,
                maximum=1,
            ),
        },
        _build_psgd_kron,
    ),
]

REGISTRY: dict[str, OptimizerEntry] = {entry.name: entry for entry in _ENTRIES}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(REGISTRY)


def _entry(name: str) -> OptimizerEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZER_NAMES)}")
    return REGISTRY[name]


def optimizer_schema(name: str) -> dict[str, Any]:
    """The JSON-ready schema of one optimizer."""
    return _entry(name).schema()


def all_schemas() -> list[dict[str, Any]]:
    """Schemas of every registered optimizer, in registry order."""
    return [entry.schema() for entry in _ENTRIES]


def validate_hyperparameters(name: str, hyperparameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check values against the schema and fill defaults; ``ValueError`` names the bad field."""
    entry = _entry(name)
    given = dict(hyperparameters or {})
    unknown = sorted(set(given) - set(entry.hyperparameters))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for {name}; "
            f"accepted: {', '.join(entry.hyperparameters)}"
        )
    return {
        key: spec.check(key, given[key]) if key in given else spec.default
        for key, spec in entry.hyperparameters.items()
    }


def build_optimizer(
    name: str,
    named_parameters: Iterable[tuple[str, Tensor]],
    hyperparameters: Mapping[str, Any] | None = None,
    roles: Mapping[str, str] | None = None,
) -> Optimizer:
    """Build the named optimizer over ``(name, param)`` pairs, routing by role where the method does."""
    entry = _entry(name)
    hp = validate_hyperparameters(name, hyperparameters)
    triples = [t for t in resolve_roles(named_parameters, roles) if t[1].requires_grad]
    if not triples:
        raise ValueError("no trainable parameters were given to the optimizer")
    return entry.build(triples, hp)
