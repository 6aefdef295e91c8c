"""ShardedOptimizer beyond parity: failures raised on every rank, checkpoints of shards, one rank.

Multi-rank cases run on 2 Gloo processes (``tests/dykaf/ranks.py``: killed after a timeout, so a
rank left waiting in a collective fails the test instead of hanging it).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import dykaf.eigenbasis
from dykaf.baselines.registry import build_optimizer
from dykaf.distributed import ShardedOptimizer, build_sharded_optimizer
from tests.dykaf.ranks import run_ranks, tiny_gpt

# A second guard beside run_ranks' own deadline: the test fails, never hangs (pytest-timeout).
pytestmark = pytest.mark.timeout(180)


def _set_grads(named: list[tuple[str, torch.Tensor]], gen: torch.Generator) -> None:
    for _, param in named:
        param.grad = torch.randn(param.shape, generator=gen)


def _outcome(opt: ShardedOptimizer) -> dict[str, Any]:
    try:
        opt.step()
    except Exception as exc:
        return {
            "type": type(exc).__name__,
            "linalg": isinstance(exc, torch.linalg.LinAlgError),
            "text": str(exc),
        }
    return {"type": None}


# ---------------------------------------------------------------------------- failure consensus
def _failure_rank(rank: int, world_size: int, folder: str) -> None:
    named = tiny_gpt()
    opt = build_sharded_optimizer("dykaf", named, {"precondition_frequency": 1})
    gen = torch.Generator().manual_seed(0)
    report: dict[str, Any] = {}
    _set_grads(named, gen)
    report["init"] = _outcome(opt)  # initialises every factor: no refresh yet
    if rank == 1:  # the next step's eigenbasis refresh fails on rank 1 only
        original = dykaf.eigenbasis.refresh

        def failing(*args: Any) -> Any:
            raise torch.linalg.LinAlgError("simulated: the eigendecomposition did not converge")

        dykaf.eigenbasis.refresh = failing
    _set_grads(named, gen)
    report["linalg"] = _outcome(opt)
    if rank == 1:
        dykaf.eigenbasis.refresh = original
    inner_step = opt.inner.step
    if rank == 0:  # another kind of error, on rank 0 only

        def broken(closure: Any = None) -> None:
            raise ValueError("simulated bug")

        opt.inner.step = broken  # type: ignore[method-assign]
    report["other"] = _outcome(opt)
    opt.inner.step = inner_step  # type: ignore[method-assign]
    report["after"] = _outcome(opt)  # the ranks are still in step: a normal step completes
    try:
        build_sharded_optimizer("adamw", named[:1], {})
    except ValueError as exc:
        report["too_few"] = str(exc)
    Path(folder, f"rank{rank}.json").write_text(json.dumps(report))


def test_a_failure_on_one_rank_is_raised_on_every_rank_without_hanging(tmp_path: Path) -> None:
    run_ranks(_failure_rank, tmp_path, str(tmp_path), timeout=60)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert report["init"]["type"] is None
        # A LinAlgError on the owner is a LinAlgError everywhere (the runner's "diverged"), naming it.
        linalg = report["linalg"]
        assert linalg["linalg"]
        assert "failed on rank 1 " in linalg["text"] and "LinAlgError: simulated" in linalg["text"]
        assert f"this is rank {rank}" in linalg["text"]
        # Any other error is a RuntimeError (not a divergence) on every rank, naming the rank.
        other = report["other"]
        assert other["type"] == "RuntimeError" and not other["linalg"]
        assert "failed on rank 0 " in other["text"] and "rank 0: ValueError: simulated bug" in other["text"]
        assert report["after"]["type"] is None
        # Each rank must own a parameter: one parameter cannot be shared by two ranks.
        assert "cannot give each of 2 ranks one to own" in report["too_few"]


# ---------------------------------------------------------------------------- checkpoints
RESUME = {
    "dykaf": {"precondition_frequency": 2},
    "muon": {},
    "shampoo": {"precondition_frequency": 2, "start_preconditioning_step": 2},
}
SAVE_AT, STEPS = 3, 7


def _schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def _resume_rank(rank: int, world_size: int, folder: str) -> None:
    report: dict[str, Any] = {}
    for name, hyperparameters in RESUME.items():
        grads = torch.Generator().manual_seed(3)
        named = tiny_gpt()
        opt = build_sharded_optimizer(name, named, hyperparameters)
        schedule = _schedule(opt)
        path = Path(folder, f"{name}-rank{rank}.pt")
        for step in range(STEPS):
            if step == SAVE_AT:
                checkpoint = {
                    "params": [p.detach().clone() for _, p in named],
                    "optimizer": opt.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": torch.get_rng_state(),  # Shampoo draws from the global generator
                }
                torch.save(checkpoint, path)
            _set_grads(named, grads)
            opt.step()
            schedule.step()
        uninterrupted = [p.detach().clone() for _, p in named]

        saved = torch.load(path, weights_only=False)
        resumed_named = tiny_gpt(seed=5)  # other values: the checkpoint must set them all
        with torch.no_grad():
            for (_, param), value in zip(resumed_named, saved["params"], strict=True):
                param.copy_(value)
        resumed = build_sharded_optimizer(name, resumed_named, hyperparameters)
        resumed_schedule = _schedule(resumed)
        resumed.load_state_dict(saved["optimizer"])
        resumed_schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["rng"])
        grads = torch.Generator().manual_seed(3)
        for step in range(STEPS):
            _set_grads(resumed_named, grads)  # the same gradient stream, steps before SAVE_AT unused
            if step >= SAVE_AT:
                resumed.step()
                resumed_schedule.step()
        report[name] = {
            "equal": all(torch.equal(a, b) for a, (_, b) in zip(uninterrupted, resumed_named, strict=True)),
            "moved": min(
                float((a - b).abs().max()) for a, b in zip(uninterrupted, saved["params"], strict=True)
            ),
            "sharding": saved["optimizer"]["sharding"],
        }
        try:  # the other rank's shard
            resumed.load_state_dict(
                torch.load(Path(folder, f"{name}-rank{1 - rank}.pt"), weights_only=False)["optimizer"]
            )
        except ValueError as exc:
            report[name]["other_rank"] = str(exc)
    Path(folder, f"rank{rank}.json").write_text(json.dumps(report))


def test_a_resumed_shard_continues_exactly_and_other_world_sizes_are_refused(tmp_path: Path) -> None:
    run_ranks(_resume_rank, tmp_path, str(tmp_path), timeout=60)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        for name in RESUME:
            result = report[name]
            assert result["moved"] > 1e-4, name  # the steps after the checkpoint changed every parameter
            assert result["equal"], f"{name} on rank {rank} left the uninterrupted trajectory"
            assert result["sharding"]["world_size"] == 2 and result["sharding"]["rank"] == rank
            assert "rank" in result["other_rank"] and "same devices_per_run" in result["other_rank"]
    # Rank 0's DyKAF shard, loaded by a single-device run: refused with the reason.
    saved = torch.load(tmp_path / "dykaf-rank0.pt", weights_only=False)["optimizer"]
    single = build_sharded_optimizer("dykaf", tiny_gpt(), RESUME["dykaf"])
    with pytest.raises(
        ValueError, match=r"shard of a run on 2 devices.*rank 0 of 1.*same devices_per_run \(2\)"
    ):
        single.load_state_dict(saved)


def test_a_plain_or_foreign_state_dict_is_refused_with_the_reason() -> None:
    named = tiny_gpt()
    opt = build_sharded_optimizer("adamw", named, {})
    plain = build_optimizer("adamw", tiny_gpt(), {})
    with pytest.raises(ValueError, match="not saved by a sharded optimizer"):
        opt.load_state_dict(plain.state_dict())
    other_model = build_sharded_optimizer("adamw", tiny_gpt(layers=1), {})
    with pytest.raises(ValueError, match="another parameter ownership"):
        opt.load_state_dict(other_model.state_dict())


# ---------------------------------------------------------------------------- one rank
@pytest.mark.parametrize("name", ["dykaf", "muon", "adamw"])
def test_one_rank_is_the_inner_optimizer_exactly(name: str) -> None:
    sharded_named, plain_named = tiny_gpt(), tiny_gpt()
    sharded = build_sharded_optimizer(
        name, sharded_named, {"precondition_frequency": 2} if name == "dykaf" else {}
    )
    plain = build_optimizer(name, plain_named, {"precondition_frequency": 2} if name == "dykaf" else {})
    assert (sharded.rank, sharded.world_size) == (0, 1) and type(sharded.inner) is type(plain)
    assert sharded.owned == [n for n, _ in sharded_named] and set(sharded.owners.values()) == {0}
    schedules = [_schedule(sharded), _schedule(plain)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for (_, a), (_, b) in zip(sharded_named, plain_named, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        sharded.step()
        plain.step()
        for schedule in schedules:
            schedule.step()
    for (_, a), (_, b) in zip(sharded_named, plain_named, strict=True):
        assert torch.equal(a, b)
    assert [g["lr"] for g in sharded.param_groups] == [g["lr"] for g in plain.param_groups]
    assert sharded.param_groups[0]["lr"] == pytest.approx(sharded.param_groups[0]["initial_lr"] / 6)


def test_zero_grad_clears_every_parameter_and_the_state_is_the_inner_one() -> None:
    named = tiny_gpt()
    opt = build_sharded_optimizer("dykaf", named, {}, pinned={"h.0.attn.c_attn.weight": 0})
    _set_grads(named, torch.Generator().manual_seed(0))
    opt.step()
    assert opt.state is opt.inner.state and len(opt.state) == len(named)
    probed = dict(named)["h.0.attn.c_attn.weight"]
    assert opt.preconditioner_state(probed) is not None and opt.preconditioner_state(probed).left is not None
    opt.zero_grad()
    assert all(p.grad is None for _, p in named)
    _set_grads(named, torch.Generator().manual_seed(1))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for _, p in named)
    with pytest.raises(NotImplementedError, match="fixed when it is built"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_bad_arguments_are_refused_by_name() -> None:
    named = tiny_gpt()
    with pytest.raises(ValueError, match="pinned parameter 'nope'"):
        build_sharded_optimizer("adamw", named, {}, pinned={"nope": 0})
    with pytest.raises(ValueError, match=r"names rank 1, outside 0\.\.0"):
        build_sharded_optimizer("adamw", named, {}, pinned={"wte.weight": 1})
    with pytest.raises(ValueError, match="lr"):
        build_sharded_optimizer("adamw", named, {"lr": -1})
    with pytest.raises(ValueError, match=r"'wte\.weight' and 'tied' are the same tensor"):
        ShardedOptimizer(
            [*named, ("tied", named[0][1])], lambda s: torch.optim.AdamW([p for _, p in s]), lambda n, p: 1.0
        )
    frozen = copy.deepcopy(named)
    for _, param in frozen:
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_sharded_optimizer("adamw", frozen, {})
