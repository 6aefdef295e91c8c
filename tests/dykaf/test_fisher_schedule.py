"""The monitor's report schedule: ``observe(step)`` does only the work the next report can see.

With ``report_every`` the ring records the last ``window`` steps before a report and the shadows
run for the last ``shadow_horizon`` steps, restarting from scratch. These tests pin down that the
reports then equal an independent float64 computation of exactly that (EMA shadow, ring), stay
within the stated tolerance of the every-step monitor, and that the skipped work is really skipped.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from dykaf import DyKAF
from dykaf.fisher import FisherMonitor, optimizer_beta

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stationary_stream(m: int, n: int, steps: int, seed: int) -> list[Tensor]:
    """A 50/50 mixture of two Kronecker Fishers: stationary, so old and new history look alike."""
    g = _gen(seed)
    roots = [torch.randn(m, m, generator=g, dtype=F64) for _ in range(2)]
    rights = [torch.randn(n, n, generator=g, dtype=F64) for _ in range(2)]
    out = []
    for _ in range(steps):
        k = int(torch.rand(1, generator=g) < 0.5)
        out.append(roots[k] @ torch.randn(m, n, generator=g, dtype=F64) @ rights[k] / math.sqrt(m * n))
    return out


def _monitor(layer: nn.Module, **kwargs: object) -> FisherMonitor:
    return FisherMonitor(layer, layers=["weight"], window=6, beta=0.9, **kwargs)  # type: ignore[arg-type]


def _rows(monitor: FisherMonitor, step: int) -> dict[tuple[str, str], float]:
    return {(r.method, r.metric): r.value for r in monitor.report(step)}


def test_horizon_follows_beta_and_tail_and_never_undercuts_the_window() -> None:
    layer = nn.Linear(5, 4, bias=False).double()
    probe = _monitor(layer).probes["weight"]
    assert probe.shadow_horizon(1e-3) == math.ceil(math.log(1e-3) / math.log(0.9)) == 66
    assert probe.shadow_horizon(0.9) == 6  # log(0.9)/log(0.9) = 1 step, but the window is 6
    with pytest.raises(ValueError, match="tail"):
        probe.shadow_horizon(0.0)
    with pytest.raises(ValueError, match="report_every"):
        _monitor(layer, report_every=0)
    with pytest.raises(ValueError, match="last_step"):
        _monitor(layer, report_every=5, last_step=0)


def test_scheduled_reports_equal_the_truncated_dense_computation_and_track_the_full_monitor() -> None:
    m, n, every, tail = 4, 5, 100, 1e-3
    layer = nn.Linear(n, m, bias=False).double()
    full = _monitor(layer)
    scheduled = _monitor(layer, report_every=every, shadow_tail=tail)
    horizon = scheduled.horizons["weight"]
    assert horizon == 66 < every
    stream = _stationary_stream(m, n, 3 * every, seed=1)
    for step, grad in enumerate(stream, start=1):
        layer.weight.grad = grad
        full.observe()
        scheduled.observe(step)
        if step % every:
            continue
        probe = scheduled.probes["weight"]
        # The EMA shadow is exactly SOAP's factor over the last `horizon` gradients (from zero).
        recent = stream[step - horizon : step]
        left = sum((1 - 0.9) * 0.9 ** (horizon - 1 - i) * g @ g.T for i, g in enumerate(recent))
        right = sum((1 - 0.9) * 0.9 ** (horizon - 1 - i) * g.T @ g for i, g in enumerate(recent))
        shadow = probe.shadows["soap_shampoo"]
        torch.testing.assert_close(shadow.left, left, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(shadow.right, right, rtol=1e-10, atol=1e-12)
        assert probe.shadows["dykaf"].steps == probe.shadows["dykaf_seq"].steps == horizon
        # The ring holds exactly the last `window` gradients.
        assert {tuple(g.flatten().tolist()) for g in probe.ring} == {
            tuple(g.flatten().tolist()) for g in stream[step - probe.window : step]
        }
        # Same rows; values within the tail's reach of the every-step monitor (the floor and the
        # window's own quantities do not depend on the shadows: identical).
        got, ref = _rows(scheduled, step), _rows(full, step)
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            if key[0] in ("optimal", "window"):
                assert math.isclose(got[key], value, rel_tol=1e-12), key
            else:
                assert abs(got[key] - value) <= 5e-3, (step, key, got[key], value)


def test_work_outside_the_horizon_is_skipped() -> None:
    m, n, every = 3, 4, 100
    layer = nn.Linear(n, m, bias=False).double()
    scheduled = _monitor(layer, report_every=every)
    probe = scheduled.probes["weight"]
    horizon = scheduled.horizons["weight"]
    updates = {"count": 0}
    original = probe.shadows["soap_shampoo"].update

    def counting(grad: Tensor, beta: float) -> None:
        updates["count"] += 1
        original(grad, beta)

    probe.shadows["soap_shampoo"].update = counting  # type: ignore[method-assign]
    for step, grad in enumerate(_stationary_stream(m, n, 2 * every, seed=2), start=1):
        layer.weight.grad = grad
        scheduled.observe(step)
    assert updates["count"] == 2 * horizon
    assert probe.observed == 2 * probe.window  # ring writes


def test_a_cadence_inside_the_horizon_feeds_every_step_like_the_unscheduled_monitor() -> None:
    layer = nn.Linear(4, 3, bias=False).double()
    full, scheduled = _monitor(layer), _monitor(layer, report_every=50)  # horizon 66 > 50
    for step, grad in enumerate(_stationary_stream(3, 4, 100, seed=3), start=1):
        layer.weight.grad = grad
        full.observe()
        scheduled.observe(step)
    got, ref = _rows(scheduled, 100), _rows(full, 100)
    assert got.keys() == ref.keys()
    # Same gradients, same shadow history; only the ring's slot order (summation order) differs.
    assert all(math.isclose(got[k], ref[k], rel_tol=1e-12) for k in ref)


def test_last_step_is_a_report_step_with_its_own_burn_in() -> None:
    layer = nn.Linear(4, 3, bias=False).double()
    every, last = 100, 230
    scheduled = _monitor(layer, report_every=every, last_step=last)
    assert [s for s in range(1, last + 1) if scheduled.is_report_step(s)] == [100, 200, 230]
    assert scheduled.steps_until_report(201) == 29
    assert _monitor(layer).is_report_step(7)  # no schedule: any step
    for step, grad in enumerate(_stationary_stream(3, 4, last, seed=4), start=1):
        layer.weight.grad = grad
        scheduled.observe(step)
    # 230 is within the horizon (66) of 200: the shadows ran on from their restart before 200.
    assert scheduled.probes["weight"].shadows["dykaf"].steps == 66 + 30


def test_dykaf_run_still_links_its_own_factors_under_a_schedule() -> None:
    """The link needs the shadow to have seen every gradient the optimizer has: fed until decided."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5, bias=False)
    optimizer = DyKAF(layer.parameters(), lr=1e-3, shampoo_beta=0.8, precondition_frequency=2)
    monitor = FisherMonitor(layer, optimizer, layers=["weight"], window=4, report_every=60)
    probe = monitor.probes["weight"]
    assert monitor.horizons["weight"] == math.ceil(math.log(1e-3) / math.log(0.8)) < 60
    g = _gen(5)
    rows = []
    for step in range(1, 61):
        layer.weight.grad = torch.randn(5, 6, generator=g)
        monitor.observe(step)
        optimizer.step()
        if monitor.is_report_step(step):
            rows = monitor.report(step)
    assert probe.linked == "dykaf"
    assert {r.method for r in rows} >= {"own", "optimal", "dykaf", "dykaf_seq", "soap_shampoo"}
    assert probe.shadows["dykaf_seq"].steps == monitor.horizons["weight"]


def test_scheduled_monitor_resumes_mid_burn_in_exactly() -> None:
    layer = nn.Linear(4, 3, bias=False).double()
    monitor = _monitor(layer, report_every=100)
    clone_layer = copy.deepcopy(layer)
    clone = _monitor(clone_layer, report_every=100)
    for step, grad in enumerate(_stationary_stream(3, 4, 100, seed=6), start=1):
        layer.weight.grad = grad
        monitor.observe(step)
        if step == 70:  # inside the burn-in (it started at step 35)
            clone.load_state_dict(copy.deepcopy(monitor.state_dict()))
        elif step > 70:
            clone_layer.weight.grad = grad.clone()
            clone.observe(step)
    assert monitor.report(100) == clone.report(100)


def test_beta_is_the_factor_decay_only_for_kronecker_optimizers() -> None:
    layer = nn.Linear(3, 4)
    assert optimizer_beta(torch.optim.AdamW(layer.parameters(), betas=(0.9, 0.999)), layer.weight) == 0.95
    assert optimizer_beta(DyKAF(layer.parameters(), betas=(0.9, 0.97)), layer.weight) == 0.97


def _same(a: object, b: object) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_has_work_is_false_exactly_when_observe_changes_nothing(with_optimizer: bool) -> None:
    # The runner skips observe (and its device syncs) when has_work says so: it must never skip a
    # step whose gradient a report, a shadow or the own-factor link needs.
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False).double()
    optimizer = DyKAF(layer.parameters(), lr=1e-3, shampoo_beta=0.9) if with_optimizer else None
    monitor = FisherMonitor(layer, optimizer, layers=["weight"], window=6, beta=0.9, report_every=100)
    probe, horizon = monitor.probes["weight"], monitor.horizons["weight"]
    undecided_steps = 0
    for step, grad in enumerate(_stationary_stream(3, 4, 200, seed=7), start=1):
        layer.weight.grad = grad
        before = copy.deepcopy(monitor.state_dict())
        undecided = optimizer is not None and not probe.link_decided
        undecided_steps += undecided
        work = monitor.has_work(step)
        until = monitor.steps_until_report(step)
        assert until is not None
        assert work == (until < horizon or undecided), step
        monitor.observe(step)
        if optimizer is not None:
            optimizer.step()
        if not work:
            assert _same(monitor.state_dict(), before), f"observe changed the monitor at idle step {step}"
    assert (undecided_steps > 0) == with_optimizer and probe.linked == ("dykaf" if with_optimizer else None)
