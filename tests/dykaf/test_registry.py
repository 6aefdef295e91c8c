"""The optimizer registry: schemas, validation messages, routing and that every entry trains."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from dykaf.baselines import registry
from dykaf.baselines.routed import RoutedOptimizer

EXPECTED = {"dykaf", "dykaf-seq", "dykaf-rank1", "soap", "adamw", "adafactor", "muon", "shampoo", "psgd-kron"}


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(torch.tanh(self.fc(self.wte(idx)))))


def _loss(model: TinyLM, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 11), idx[:, 1:].reshape(-1))


def test_registry_lists_every_required_optimizer_with_json_schemas() -> None:
    assert set(registry.OPTIMIZER_NAMES) == EXPECTED
    schemas = registry.all_schemas()
    json.dumps(schemas)  # must be JSON-serialisable for the API and the dashboard form
    for schema in schemas:
        assert schema["hyperparameters"]["lr"]["type"] == "number"
        for spec in schema["hyperparameters"].values():
            assert {"type", "default", "help"} <= set(spec)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_optimizer_builds_and_reduces_loss(name: str) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    idx = torch.randint(0, 11, (4, 12), generator=torch.Generator().manual_seed(1))
    lrs = {"psgd-kron": 3e-3, "shampoo": 1e-3, "adafactor": 3e-2}
    opt = registry.build_optimizer(name, model.named_parameters(), {"lr": lrs.get(name, 1e-2)})
    first = float(_loss(model, idx).detach())
    for _ in range(40):
        opt.zero_grad()
        _loss(model, idx).backward()
        opt.step()
    assert float(_loss(model, idx).detach()) < first - 0.05, name


def test_muon_routes_hidden_matrices_only() -> None:
    model = TinyLM()
    opt = registry.build_optimizer("muon", model.named_parameters())
    assert isinstance(opt, RoutedOptimizer)
    muon_params = {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]}
    assert muon_params == {id(model.fc.weight)}
    adamw_params = {id(p) for g in opt.parts["adamw"].param_groups for p in g["params"]}
    assert id(model.wte.weight) in adamw_params and id(model.lm_head.weight) in adamw_params


def test_explicit_roles_override_names() -> None:
    model = TinyLM()
    roles = {"lm_head.weight": "hidden"}
    opt = registry.build_optimizer("muon", model.named_parameters(), roles=roles)
    muon_params = {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]}
    assert id(model.lm_head.weight) in muon_params


def test_routed_optimizer_checkpoint_and_scheduler() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    opt = registry.build_optimizer("muon", model.named_parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.parts["muon"].param_groups[0]["lr"] == pytest.approx(0.01)
    idx = torch.randint(0, 11, (2, 6))
    opt.zero_grad()
    _loss(model, idx).backward()
    opt.step()
    sched.step()
    saved = opt.state_dict()
    clone = registry.build_optimizer("muon", model.named_parameters())
    clone.load_state_dict(saved)
    assert len(clone.state) == len(opt.state) > 0


def test_engine_hyperparameters_reach_the_optimizer() -> None:
    model = TinyLM()
    opt = registry.build_optimizer(
        "dykaf-seq", model.named_parameters(), {"beta1": 0.9, "shampoo_beta": 0.99}
    )
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["factor_rule"] == "sequential"
    assert group["shampoo_beta"] == 0.99
    assert (
        registry.build_optimizer("dykaf-rank1", model.named_parameters()).param_groups[0]["second_moment"]
        == "rank1"
    )
    assert registry.build_optimizer("soap", model.named_parameters()).param_groups[0]["factor_rule"] == "ema"


@pytest.mark.parametrize(
    ("name", "hp", "message"),
    [
        ("nadam", {}, "unknown optimizer 'nadam'; available: dykaf, dykaf-seq"),
        ("dykaf", {"momentum": 0.9}, "unknown hyperparameter.*'momentum'.*accepted: lr, beta1"),
        ("dykaf", {"lr": -1}, "lr must be >= 0 and <= 10, got -1"),
        ("dykaf", {"lr": float("nan")}, "lr must be a finite number"),
        ("dykaf", {"beta1": 1.0}, "beta1 must be >= 0 and < 1"),
        ("dykaf", {"init": "zeros"}, "init must be one of 'kron', 'eps'"),
        ("dykaf", {"precondition_frequency": 2.5}, "precondition_frequency must be an integer"),
        ("dykaf", {"precondition_1d": "yes"}, "precondition_1d must be true or false"),
        ("muon", {"adjust_lr_fn": "x"}, "adjust_lr_fn must be one of 'original', 'match_rms_adamw'"),
        ("adamw", {"lr": "fast"}, "lr must be a number"),
    ],
)
def test_bad_values_name_the_field_and_accepted_values(name: str, hp: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        registry.validate_hyperparameters(name, hp)


def test_defaults_are_filled_and_valid() -> None:
    for name in registry.OPTIMIZER_NAMES:
        filled = registry.validate_hyperparameters(name, {})
        assert registry.validate_hyperparameters(name, filled) == filled


def test_shampoo_is_grafted_scalable_shampoo_with_its_hyperparameters() -> None:
    from pytorch_optimizer import ScalableShampoo
    from pytorch_optimizer.optimizer.utils.graft import RMSPropGraft

    model = TinyLM()
    hp = {
        "lr": 0.01,
        "beta1": 0.0,
        "beta2": 0.9,
        "precondition_frequency": 1,
        "start_preconditioning_step": 1,
    }
    opt = registry.build_optimizer("shampoo", model.named_parameters(), {**hp, "weight_decay": 0.0})
    assert isinstance(opt, RoutedOptimizer) and isinstance(opt.parts["shampoo"], ScalableShampoo)
    shampoo_params = {id(p) for g in opt.parts["shampoo"].param_groups for p in g["params"]}
    assert shampoo_params == {id(model.wte.weight), id(model.fc.weight), id(model.lm_head.weight)}
    assert opt.parts["shampoo"].param_groups[0]["betas"] == (0.0, 0.9)

    # Grafting: each layer's step takes Shampoo's direction with RMSProp's size. On the first step
    # RMSProp's second moment is (1-β2)·g², so with β1 = 0 every layer moves by exactly
    # lr·sqrt(#nonzero gradient entries)/sqrt(1-β2), whatever Shampoo's direction is.
    idx = torch.randint(0, 11, (4, 12), generator=torch.Generator().manual_seed(1))
    _loss(model, idx).backward()
    before = model.fc.weight.detach().clone()
    grad = model.fc.weight.grad.detach().double()
    nonzero = int((grad != 0).sum())
    opt.step()
    step = (model.fc.weight.detach() - before).double()
    assert float(step.norm()) == pytest.approx(0.01 * nonzero**0.5 / 0.1**0.5, rel=1e-4)
    state = opt.parts["shampoo"].state[model.fc.weight]
    assert isinstance(state["graft"], RMSPropGraft) and len(state["pre_conditioner"].statistics) == 2

    # ... and the direction is Shampoo's, L^-1/4 G R^-1/4, from a dense float64 computation of its
    # first statistics (β2·ε·I + (1-β2)·GGᵀ, ridge 1e-6·λmax as the library damps before the root).
    def inverse_fourth_root(stat: torch.Tensor) -> torch.Tensor:
        stat = stat + 1e-6 * torch.linalg.eigvalsh(stat).max() * torch.eye(len(stat), dtype=stat.dtype)
        values, vectors = torch.linalg.eigh(stat)
        return vectors @ torch.diag(values**-0.25) @ vectors.T

    eye = torch.eye(8, dtype=torch.float64)
    left = inverse_fourth_root(0.9 * 1e-6 * eye + 0.1 * grad @ grad.T)
    right = inverse_fourth_root(0.9 * 1e-6 * eye + 0.1 * grad.T @ grad)
    direction = -(left @ grad @ right)
    cosine = float((step * direction).sum() / (step.norm() * direction.norm()))
    assert cosine > 0.999, cosine


def test_fisher_probes_of_a_shampoo_run_use_its_factor_decay() -> None:
    from dykaf.fisher.monitor import DEFAULT_BETA, optimizer_beta

    model = TinyLM()
    shampoo = registry.build_optimizer("shampoo", model.named_parameters(), {"beta2": 0.8})
    assert optimizer_beta(shampoo, model.fc.weight) == 0.8
    adamw = registry.build_optimizer("adamw", model.named_parameters(), {"beta2": 0.8})
    assert optimizer_beta(adamw, model.fc.weight) == DEFAULT_BETA  # a diagonal second moment


def _shampoo_run(block_size: int = 512) -> tuple[nn.Linear, Any, list[Any]]:
    """A Shampoo-trained layer with Fisher probes, reporting after the last step."""
    from dykaf.fisher import FisherMonitor

    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False)
    hp = {"start_preconditioning_step": 1, "precondition_frequency": 1, "block_size": block_size}
    optimizer = registry.build_optimizer("shampoo", layer.named_parameters(), hp)
    monitor = FisherMonitor(layer, optimizer, layers=["weight"], window=8)
    g = torch.Generator().manual_seed(5)
    mixing = torch.randn(4, 4, generator=g)
    for _ in range(8):
        layer.weight.grad = mixing @ torch.randn(4, 6, generator=g)
        monitor.observe()
        optimizer.step()
    return layer, optimizer, monitor.report(8)


def test_shampoo_shows_its_own_factors_to_the_fisher_probes() -> None:
    layer, optimizer, rows = _shampoo_run()
    own = optimizer.preconditioner_state(layer.weight)
    pre = optimizer.parts["shampoo"].state[layer.weight]["pre_conditioner"]
    assert own is not None and own.left is pre.statistics[0] and own.right is pre.statistics[1]
    assert own.second_moment is None and own.matrix_shape == (4, 6) and own.beta == 0.95
    # The bases are those of the inverse roots Shampoo applies: they diagonalise them (float64).
    for basis, root in (
        (own.left_basis, pre.pre_conditioners[0]),
        (own.right_basis, pre.pre_conditioners[1]),
    ):
        q, p = basis.double(), root.double()
        rotated = q.T @ p @ q
        off_diagonal = rotated - torch.diag(torch.diagonal(rotated))
        assert torch.allclose(q.T @ q, torch.eye(len(q), dtype=torch.float64), atol=1e-5)
        assert float(off_diagonal.norm()) < 1e-5 * float(rotated.norm())

    values = {(r.method, r.metric): r.value for r in rows}
    assert ("own", "kron_rel_err") in values and ("own", "diag_mass") in values
    assert ("own", "precond_rel_err") not in values  # not Adam in a rotated basis
    # Its statistics are the SOAP/Shampoo EMA with the same β2, started from ε·I instead of 0.
    assert values[("own", "kron_rel_err")] == pytest.approx(
        values[("soap_shampoo", "kron_rel_err")], rel=1e-3
    )
    assert values[("own", "diag_mass")] == pytest.approx(values[("soap_shampoo", "diag_mass")], rel=1e-2)


def test_a_blocked_shampoo_matrix_has_no_single_factor_pair() -> None:
    layer, optimizer, rows = _shampoo_run(block_size=4)  # the 6-long side is split into 4 + 2
    assert optimizer.preconditioner_state(layer.weight) is None
    assert not any(r.method == "own" for r in rows) and any(r.method == "soap_shampoo" for r in rows)


def test_the_library_imports_and_builds_with_torch_only() -> None:
    """pytorch-optimizer is an optional extra: without it the library, its diagnostics and every
    torch-based optimizer work, and a baseline that needs it says how to install it."""
    script = """
import sys
sys.modules["pytorch_optimizer"] = None  # any import of it now raises ImportError
import torch, dykaf, dykaf.fisher
from dykaf import build_optimizer
layer = torch.nn.Linear(3, 2)
for name in ("dykaf", "soap", "adamw", "muon"):
    build_optimizer(name, layer.named_parameters())
for name in ("shampoo", "psgd-kron"):
    try:
        build_optimizer(name, layer.named_parameters())
    except ImportError as error:
        assert "pip install 'dykaf-lab[baselines]'" in str(error) and name in str(error), error
    else:
        raise AssertionError(name + " built without pytorch-optimizer")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
