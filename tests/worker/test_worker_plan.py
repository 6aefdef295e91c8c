"""What ``dykaf-lab worker`` starts for the devices it owns: queues, Celery pool, environment, and
the offer it registers; and the embedded worker of ``dykaf-lab up``."""

from __future__ import annotations

import os
from typing import Any

import pytest
from typer.testing import CliRunner

from server.core.config import Settings
from worker.cli import app
from worker.registration import offer_of
from worker.worker_plan import plan_worker

FOUR = lambda: [0, 1, 2, 3]  # noqa: E731 - what nvidia-smi -L lists on a 4-GPU machine


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.fixture
def settings_in(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``Settings.from_env()`` as the exec'd worker builds it from an environment."""

    def build(env: dict[str, str]) -> Settings:
        for name in [n for n in os.environ if n.startswith("DYKAF_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith("DYKAF_"):
                monkeypatch.setenv(name, value)
        return Settings.from_env()

    return build


def test_node_worker_with_four_gpus(settings_in: Any) -> None:
    plan = plan_worker(gpus="0-3", environ={"PATH": "/bin"}, listed=FOUR)
    assert plan.queues == ["gpu", "gpu-x2", "gpu-x3", "gpu-x4"]
    assert (plan.pool, plan.concurrency, plan.name) == ("threads", 4, "gpus0-3@%h")
    argv = plan.argv("INFO")
    start = argv.index("-m") + 1
    assert argv[start : start + 4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert option(argv, "-P") == "threads" and option(argv, "-c") == "4" and option(argv, "-O") == "fair"
    assert option(argv, "--prefetch-multiplier") == "1" and option(argv, "-Q") == "gpu,gpu-x2,gpu-x3,gpu-x4"
    env = plan.env
    assert env["CUDA_VISIBLE_DEVICES"] == env["DYKAF_WORKER_GPUS"] == "0,1,2,3"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["DYKAF_WORKER_DEVICE"] == "cuda"
    assert env["PATH"] == "/bin"
    settings = settings_in(env)
    assert settings.gpu_indices == (0, 1, 2, 3) and settings.worker_device == "cuda"
    offer = offer_of(settings, "gpus0-3@box")
    assert (offer.kind, offer.devices) == ("cuda", 4)
    # Physical indices that are not 0..N-1 keep their numbers (a machine shared with other work).
    plan = plan_worker(gpus="2,5,6", environ={}, listed=FOUR)
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "2,5,6" and plan.name == "gpus2_5-6@%h"
    assert plan.queues == ["gpu", "gpu-x2", "gpu-x3"] and plan.concurrency == 3


def test_cpu_worker_with_two_ranks_runs_one_run_at_a_time(settings_in: Any) -> None:
    plan = plan_worker(cpus=2, environ={"DYKAF_WORKER_GPUS": "0"})
    assert plan.queues == ["cpu", "cpu-x2"]
    assert (plan.pool, plan.concurrency) == ("solo", 1)
    argv = plan.argv()
    assert option(argv, "-P") == "solo" and option(argv, "-c") == "1" and "-O" not in argv
    assert plan.env["DYKAF_WORKER_CPU_RANKS"] == "2" and plan.env["DYKAF_WORKER_DEVICE"] == "cpu"
    assert "DYKAF_WORKER_GPUS" not in plan.env and "CUDA_VISIBLE_DEVICES" not in plan.env
    settings = settings_in(plan.env)
    assert settings.worker_cpu_ranks == 2 and settings.gpu_indices == ()
    assert (offer_of(settings, "cpu@box").kind, offer_of(settings, "cpu@box").devices) == ("cpu", 2)
    both = plan_worker(queue="gpu,cpu", cpus=2, environ={})
    assert both.queues == ["gpu", "cpu", "gpu-x2", "cpu-x2"] and "DYKAF_WORKER_DEVICE" not in both.env


def test_one_gpu_worker_is_as_before(settings_in: Any) -> None:
    plan = plan_worker(queue="gpu", gpu=0, environ={})
    assert plan.queues == ["gpu"] and (plan.pool, plan.concurrency, plan.name) == ("solo", 1, "gpu0@%h")
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "0" and plan.env["DYKAF_WORKER_DEVICE"] == "cuda"
    assert option(plan.argv(), "-P") == "solo" and option(plan.argv(), "-Q") == "gpu"
    assert offer_of(settings_in(plan.env), "gpu0@box").devices == 1
    assert plan_worker(gpus="3", environ={}).env["CUDA_VISIBLE_DEVICES"] == "3"
    # A compose file that already sets the device keeps it.
    assert plan_worker(gpu=0, environ={"DYKAF_WORKER_DEVICE": "cpu"}).env["DYKAF_WORKER_DEVICE"] == "cpu"
    # No option: today's plain worker; or the devices the environment declares.
    assert plan_worker(environ={}).queues == ["gpu"]
    from_env = plan_worker(environ={"DYKAF_WORKER_CPU_RANKS": "3"}, queue="cpu")
    assert from_env.queues == ["cpu", "cpu-x2", "cpu-x3"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gpu": 0, "gpus": "0-3"}, "--gpu and --gpus"),
        ({"gpus": "0-3", "cpus": 2}, "not both"),
        ({"cpus": 65}, "--cpus"),
        ({"gpus": "0-"}, "--gpus"),
        ({"queue": ","}, "--queue"),
    ],
)
def test_bad_options_are_named(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_worker(environ={}, listed=FOUR, **options)


def test_the_worker_command_execs_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr("worker.cli_service.os.execvpe", lambda _f, argv, env: seen.append((argv, env)))
    result = CliRunner().invoke(app, ["worker", "--gpus", "0-1", "--name", "node@h"])
    assert result.exit_code == 0, result.output
    ((argv, env),) = seen
    assert option(argv, "-Q") == "gpu,gpu-x2" and option(argv, "-P") == "threads"
    assert option(argv, "-n") == "node@h"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["PYTHONPATH"].split(os.pathsep)[0]
    result = CliRunner().invoke(app, ["worker", "--gpu", "0", "--gpus", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--gpu and --gpus" in result.output
    assert len(seen) == 1


def test_embedded_worker_offers_two_cpu_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli_service import embedded_worker

    monkeypatch.delenv("DYKAF_WORKER_CPU_RANKS", raising=False)
    settings, queues = embedded_worker(Settings())
    assert queues == ["gpu", "cpu", "gpu-x2", "cpu-x2"]
    assert settings.worker_cpu_ranks == 2 and settings.env()["DYKAF_WORKER_CPU_RANKS"] == "2"
    assert offer_of(settings, "embedded@box").kind == "cpu"
    monkeypatch.setenv("DYKAF_WORKER_CPU_RANKS", "3")
    settings, queues = embedded_worker(Settings.from_env())
    assert queues[-2:] == ["gpu-x3", "cpu-x3"] and settings.worker_cpu_ranks == 3
