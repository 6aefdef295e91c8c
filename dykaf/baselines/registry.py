"""Every optimizer the service can run, by name, with a hyperparameter schema.

The schema (type, default, range, help) is what the REST API validates against and what the
dashboard renders as a form, so it is data, not code: each entry names its config dataclass
(:class:`dykaf.options.DyKAFConfig`, :mod:`dykaf.baselines.configs`) and the schema is derived from
it, so the values the form offers are exactly those the config accepts. Baselines come from
well-kept libraries: ``torch.optim`` (AdamW, Adafactor, Muon) and ``pytorch-optimizer`` (grafted
ScalableShampoo, PSGD Kron); only DyKAF and SOAP (one engine) are written here.

Routing follows practice (``roles.py``): Muon takes hidden 2-D matrices and AdamW the embeddings,
head and 1-D params; Shampoo takes matrices whose every side fits ``max_precond_dim`` and AdamW the
rest; the DyKAF engine runs 1-D params as Adam itself.

Each entry also states what its step costs per parameter (``costs.py``), following the same routing:
:func:`shard_cost` is what a sharded step (``dykaf.distributed``) balances its ranks by.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from dykaf.baselines import costs
from dykaf.baselines import roles as role_names
from dykaf.baselines.configs import (
    AdafactorConfig,
    AdamWConfig,
    MuonConfig,
    PSGDKronConfig,
    ShampooConfig,
)
from dykaf.baselines.optional import pytorch_optimizer
from dykaf.baselines.roles import infer_role, resolve_roles
from dykaf.baselines.routed import RoutedOptimizer
from dykaf.baselines.shampoo_state import shampoo_class
from dykaf.config import Hyperparameter, OptimizerConfig
from dykaf.optimizer import DyKAF
from dykaf.options import DyKAFConfig

Triples = list[tuple[str, Tensor, str]]


@dataclass(frozen=True)
class OptimizerEntry:
    """A registry entry: its config class, the config fields the entry fixes (``preset``: e.g. the
    factor rule that makes the engine DyKAF or SOAP; they are not in its schema), a builder taking
    resolved ``(name, param, role)`` triples and the validated config, and the relative cost of its
    step per parameter, ``cost(config, name, param, role)`` (``costs.py``)."""

    name: str
    description: str
    source: str
    config: type[OptimizerConfig]
    build: Callable[[Triples, Any], Optimizer]
    preset: Mapping[str, Any] = field(default_factory=dict)
    cost: Callable[[Any, str, Tensor, str], float] = costs.elementwise

    @property
    def hyperparameters(self) -> dict[str, Hyperparameter]:
        """The user-settable hyperparameters (the config's fields less the preset ones)."""
        return {k: h for k, h in self.config.hyperparameters().items() if k not in self.preset}

    def configure(self, hyperparameters: Mapping[str, Any] | None) -> OptimizerConfig:
        """The validated config; ``ValueError`` names the bad or unknown field."""
        return self.config.from_mapping(hyperparameters or {}, owner=self.name, preset=self.preset)

    def schema(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "hyperparameters": self.config.schema(exclude=self.preset),
        }


def _params(triples: Triples) -> list[Tensor]:
    return [p for _, p, _ in triples]


def _build_engine(triples: Triples, config: DyKAFConfig) -> Optimizer:
    return DyKAF(_params(triples), **config.as_kwargs())


def _adamw(params: list[Tensor], lr: float, beta1: float, beta2: float, eps: float, wd: float) -> Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)


def _build_adamw(triples: Triples, config: AdamWConfig) -> Optimizer:
    c = config
    return _adamw(_params(triples), c.lr, c.beta1, c.beta2, c.eps, c.weight_decay)


def _build_adafactor(triples: Triples, config: AdafactorConfig) -> Optimizer:
    return torch.optim.Adafactor(
        _params(triples),
        lr=config.lr,
        beta2_decay=config.beta2_decay,
        eps=(None, config.eps2),
        d=config.clip_threshold,
        weight_decay=config.weight_decay,
    )


def _routed(
    primary_name: str,
    primary: list[Tensor],
    rest: list[Tensor],
    make_primary: Callable[[list[Tensor]], Optimizer],
    config: MuonConfig | ShampooConfig,
) -> Optimizer:
    """``primary`` to the method, ``rest`` to AdamW with the config's ``adamw_*`` hyperparameters."""
    c = config
    parts: dict[str, Optimizer] = {}
    if primary:
        parts[primary_name] = make_primary(primary)
    if rest:
        parts["adamw"] = _adamw(
            rest, c.adamw_lr, c.adamw_beta1, c.adamw_beta2, c.adamw_eps, c.adamw_weight_decay
        )
    return RoutedOptimizer(parts)


def _build_muon(triples: Triples, config: MuonConfig) -> Optimizer:
    hidden = [p for _, p, role in triples if role == role_names.HIDDEN and p.ndim == 2]
    rest = [p for _, p, role in triples if not (role == role_names.HIDDEN and p.ndim == 2)]

    def make(params: list[Tensor]) -> Optimizer:
        return torch.optim.Muon(
            params,
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
            nesterov=config.nesterov,
            ns_steps=config.ns_steps,
            adjust_lr_fn=config.adjust_lr_fn,
        )

    return _routed("muon", hidden, rest, make, config)


def _build_shampoo(triples: Triples, config: ShampooConfig) -> Optimizer:
    """Shampoo as practitioners run it: pytorch-optimizer's ``ScalableShampoo`` (a port of Google's
    scalable_shampoo), i.e. EMA Kronecker statistics with inverse roots every few steps, blocked
    large sides, Nesterov momentum and layer-wise grafting. Grafting (Agarwal et al. 2020) takes each
    layer's update *direction* from Shampoo and its *size* from RMSProp, which is what makes Shampoo
    competitive with Adam in practice; the library's plain ``Shampoo`` (the 2018 AdaGrad-sum version
    without grafting) trails AdamW far behind on a language model, so it would make a straw-man
    baseline."""
    graft_types = pytorch_optimizer("shampoo", "optimizer.utils.graft").LayerWiseGrafting
    fits = [p for _, p, _ in triples if costs.shampoo_takes(p, config.max_precond_dim)]
    rest = [p for _, p, _ in triples if not costs.shampoo_takes(p, config.max_precond_dim)]

    def make(params: list[Tensor]) -> Optimizer:
        optimizer = shampoo_class()(
            params,
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            moving_average_for_momentum=True,  # an EMA like Adam's β1, so lr means what it means there
            weight_decay=config.weight_decay,
            decoupled_weight_decay=True,
            start_preconditioning_step=config.start_preconditioning_step,
            preconditioning_compute_steps=config.precondition_frequency,
            block_size=config.block_size,
            # Off: the library would otherwise flatten any matrix with ≤ block_size entries into a
            # vector and run grafted RMSProp on it; Shampoo preconditions every matrix as a matrix.
            shape_interpretation=False,
            inverse_exponent_override=config.inverse_root,
            graft_type=graft_types[config.graft.upper()],  # GRAFTS are the enum's member names
            nesterov=config.nesterov,
            matrix_eps=config.matrix_eps,
        )
        # The group key the Fisher probes read as "this optimizer's Kronecker-factor decay"
        # (dykaf.fisher.monitor.optimizer_beta), as on DyKAF/SOAP groups; the library ignores it.
        for group in optimizer.param_groups:
            group["shampoo_beta"] = config.beta2
        return optimizer

    return _routed("shampoo", fits, rest, make, config)


def _build_psgd_kron(triples: Triples, config: PSGDKronConfig) -> Optimizer:
    return pytorch_optimizer("psgd-kron").Kron(
        _params(triples),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        max_size_triangular=config.max_size_triangular,
        pre_conditioner_update_probability=config.preconditioner_update_probability,
    )


_ENTRIES: list[OptimizerEntry] = [
    OptimizerEntry(
        "dykaf",
        "DyKAF: projector-splitting (parallel) Kronecker factors of the Fisher, Adam in their eigenbasis",
        "dykaf",
        DyKAFConfig,
        _build_engine,
        preset={"factor_rule": "parallel", "second_moment": "full"},
        cost=costs.engine,
    ),
    OptimizerEntry(
        "dykaf-seq",
        "DyKAF with the sequential (Lubich–Oseledets KSL) projector-splitting factor update",
        "dykaf",
        DyKAFConfig,
        _build_engine,
        preset={"factor_rule": "sequential", "second_moment": "full"},
        cost=costs.engine,
    ),
    OptimizerEntry(
        "dykaf-rank1",
        "DyKAF with a rank-1 second moment (no m×n buffer: memory saver)",
        "dykaf",
        DyKAFConfig,
        _build_engine,
        preset={"factor_rule": "parallel", "second_moment": "rank1"},
        cost=costs.engine,
    ),
    OptimizerEntry(
        "soap",
        "SOAP: Shampoo's EMA factors, Adam in their eigenbasis (the DyKAF engine with factor_rule=ema)",
        "dykaf",
        DyKAFConfig,
        _build_engine,
        # ``init`` belongs to the projector-splitting rules; the ema rule starts from zero.
        preset={"factor_rule": "ema", "second_moment": "full", "init": "kron"},
        cost=costs.engine,
    ),
    OptimizerEntry("adamw", "AdamW (torch.optim.AdamW)", "torch.optim", AdamWConfig, _build_adamw),
    OptimizerEntry(
        "adafactor", "Adafactor (torch.optim.Adafactor)", "torch.optim", AdafactorConfig, _build_adafactor
    ),
    OptimizerEntry(
        "muon",
        "Muon (torch.optim.Muon) on hidden matrices, AdamW on embeddings, head and 1-D params",
        "torch.optim",
        MuonConfig,
        _build_muon,
        cost=costs.muon,
    ),
    OptimizerEntry(
        "shampoo",
        "Shampoo with RMSProp grafting (pytorch-optimizer's ScalableShampoo) on matrices within "
        "max_precond_dim, AdamW on the rest",
        "pytorch-optimizer",
        ShampooConfig,
        _build_shampoo,
        cost=costs.shampoo,
    ),
    OptimizerEntry(
        "psgd-kron",
        "PSGD Kron (pytorch-optimizer)",
        "pytorch-optimizer",
        PSGDKronConfig,
        _build_psgd_kron,
        cost=costs.psgd_kron,
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
    """Check values with the optimizer's config and fill defaults; ``ValueError`` names the bad field."""
    entry = _entry(name)
    values = entry.configure(hyperparameters).as_dict()
    return {key: values[key] for key in entry.hyperparameters}


def build_optimizer(
    name: str,
    named_parameters: Iterable[tuple[str, Tensor]],
    hyperparameters: Mapping[str, Any] | None = None,
    roles: Mapping[str, str] | None = None,
) -> Optimizer:
    """Build the named optimizer over ``(name, param)`` pairs, routing by role where the method does."""
    entry = _entry(name)
    config = entry.configure(hyperparameters)
    triples = [t for t in resolve_roles(named_parameters, roles) if t[1].requires_grad]
    if not triples:
        raise ValueError("no trainable parameters were given to the optimizer")
    return entry.build(triples, config)


def shard_cost(
    optimizer_name: str,
    hyperparameters: Mapping[str, Any] | None,
    roles: Mapping[str, str] | None = None,
) -> Callable[[str, Tensor], float]:
    """``cost(name, param)``: the relative cost of the named optimizer's step on one parameter, as
    it routes that parameter (explicit ``roles`` first, else :func:`roles.infer_role`), for
    balancing a sharded step's ranks (``dykaf.distributed``). The hyperparameters are validated
    as by :func:`build_optimizer` (``ValueError`` names a bad one) and defaults filled in, since
    some costs read them (``max_precond_dim``, ``block_size``...)."""
    entry = _entry(optimizer_name)
    config = entry.configure(hyperparameters)

    def cost(name: str, param: Tensor) -> float:
        role = (roles or {}).get(name) or infer_role(name, param)
        return entry.cost(config, name, param, role)

    return cost
