"""Static checks of the cluster files (no container engine runs here): docker-compose.yml, the
Dockerfile, .dockerignore, docker/.env.example and the scripts under docker/.

The compose file is parsed with PyYAML and its ``${VAR:-default}`` references are resolved the way
``docker compose`` does, with the values of docker/.env.example. The checks tie the files to the
code: the environment variables the code reads (found by scanning server/ and worker/), the
``dykaf-lab`` CLI options (from the Typer app), the Celery queues, the health route, and the files
the Dockerfile copies.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"

# Services built from this project's image (everything except postgres, redis and flower).
APP_SERVICES = ("migrate", "api", "worker-gpu0", "worker-gpu1", "worker-node", "worker-cpu")
WORKERS = ("worker-gpu0", "worker-gpu1", "worker-node", "worker-cpu")
GPU_WORKERS = ("worker-gpu0", "worker-gpu1")  # one GPU each; worker-node owns them all
API_CONTAINER_PORT = 8000

# DYKAF_* variables the code reads that the service containers must not get from compose:
CLIENT_ONLY = {"DYKAF_SERVER", "DYKAF_API_KEY"}  # the HTTP client commands (submit, status, ...)
# `dykaf-lab worker --gpu/--gpus/--cpus/--queue cpu` sets them from its options:
SET_BY_WORKER_COMMAND = {"DYKAF_WORKER_DEVICE", "DYKAF_WORKER_GPUS", "DYKAF_WORKER_CPU_RANKS"}
# The supervisor of a multi-device run sets it for the ranks it starts (worker/distributed/launch.py):
SET_FOR_RANKS = {"DYKAF_RANK_DEVICE"}
# Variables whose code default is the embedded mode (SQLite files under ./.lab): wrong in a
# cluster, so every service must set them explicitly.
REQUIRED = {"DYKAF_DATABASE_URL", "DYKAF_BROKER_URL", "DYKAF_DATA_DIR"}


# --- helpers -------------------------------------------------------------------------------------
def env_example() -> dict[str, str]:
    """Active (uncommented) assignments of docker/.env.example, as compose reads a .env file."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            values[match.group(1)] = match.group(2)
    return values


def documented_defaults() -> dict[str, str]:
    """``# NAME=value`` lines of docker/.env.example (documented defaults, commented out)."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#\s*([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            values[match.group(1)] = match.group(2).strip()
    return values


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?msg}`` / ``${VAR?msg}``, with nested references in defaults."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "$":
            out.append(ch)
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth += {"{": 0, "}": -1}.get(text[j], 0)
                j += 1
            assert depth == 0, f"unbalanced ${{ in {text!r}"
            body = text[i + 2 : j - 1]
            match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])(.*))?$", body, re.S)
            assert match, f"bad reference ${{{body}}}"
            name, colon, op, arg = match.groups()
            value = env.get(name)
            missing = value is None or (colon == ":" and value == "")
            if op == "-" and missing:
                value = interpolate(arg, env)
            elif op == "?" and missing:
                raise AssertionError(f"${{{name}}} is required: {arg}")
            out.append(value or "")
            i = j
            continue
        match = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)", text[i:])
        assert match, f"stray $ in {text!r}"
        out.append(env.get(match.group(1), ""))
        i += match.end()
    return "".join(out)


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def referenced_variables(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text.replace("$$", "")))


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the << merge keys
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    """The compose file as `docker compose config` would see it with docker/.env.example as .env."""
    return resolve(raw, env_example())


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def option_value(argv: list[str], option: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def code_variables() -> set[str]:
    """Every ``DYKAF_*`` name the service code reads: one per ``Settings`` field, and any other
    named in server/ and worker/ (the client commands' variables)."""
    from server.core.config import Settings

    names = set(Settings.env_names().values())
    for base in ("server", "worker"):
        for path in (ROOT / base).rglob("*.py"):
            names |= set(re.findall(r"\bDYKAF_[A-Z][A-Z0-9_]*\b", path.read_text()))
    return names


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("DYKAF_"):
            monkeypatch.delenv(name)
    return monkeypatch


# --- compose: structure ------------------------------------------------------------------------
def test_compose_parses_and_has_the_services(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", *APP_SERVICES, "flower"):
        assert name in services, f"service {name} missing"
    # Optional pieces sit behind profiles; the core stack has none.
    assert services["worker-cpu"].get("profiles") == ["cpu"]
    assert services["worker-node"].get("profiles") == ["node"]  # the alternative to worker-gpuN
    assert services["flower"].get("profiles") == ["monitoring"]
    for name in ("postgres", "redis", "migrate", "api", *GPU_WORKERS):
        assert not services[name].get("profiles"), name
    # Top-level keys compose knows (x-* are extension fields).
    allowed = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
    assert {k for k in raw if not k.startswith("x-")} <= allowed
    for name in APP_SERVICES:
        assert services[name]["image"] == "dykaf-lab:latest"
        assert services[name]["build"]["context"] == "."
        assert services[name].get("init") is True, f"{name}: init (tini) forwards signals to the worker"


def compose_code() -> str:
    """docker-compose.yml without its comment lines."""
    return "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))


def test_every_variable_is_documented_with_its_default(raw: dict[str, Any]) -> None:
    text = compose_code()
    used = referenced_variables(text)
    documented = set(env_example()) | set(documented_defaults())
    assert used - documented == set(), "variables used in docker-compose.yml but not in docker/.env.example"
    # Each documented default equals the default written in docker-compose.yml.
    compose_defaults = dict(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-((?:[^${}]|\$\{[^}]*\})*)\}", text))
    for name, value in documented_defaults().items():
        if name in compose_defaults and compose_defaults[name] and not name.startswith("DYKAF_"):
            assert value == compose_defaults[name], (name, value, compose_defaults[name])
    for name, value in env_example().items():
        if name in compose_defaults:
            assert value == compose_defaults[name], (name, value, compose_defaults[name])
    # A variable used several times has one default everywhere.
    for name in used:
        found = set(re.findall(rf"\$\{{{name}:-((?:[^${{}}]|\$\{{[^}}]*\}})*)\}}", text))
        assert len(found) <= 1, (name, found)


# --- compose: environment against the code -------------------------------------------------------
def test_code_variables_are_all_classified() -> None:
    """A new DYKAF_* variable in the code must be wired into the compose file (or classified here)."""
    from server.core.config import Settings

    from_settings = set(Settings.env_names().values())
    assert set(Settings().env()) <= from_settings  # what a child process is handed is a setting
    known = from_settings | CLIENT_ONLY | SET_FOR_RANKS
    assert code_variables() - known == set(), (
        "variables read by the code that docker-compose.yml does not know about: pass them in the "
        "x-lab-env block and document them in docker/.env.example"
    )


def test_every_service_gets_the_variables_the_code_reads(compose: dict[str, Any]) -> None:
    needed = code_variables() - CLIENT_ONLY - SET_BY_WORKER_COMMAND - SET_FOR_RANKS
    for name in APP_SERVICES:
        env = environment(compose["services"][name])
        missing = needed - set(env)
        assert not missing, f"{name} lacks {sorted(missing)}"
        for var in REQUIRED:
            assert env[var], f"{name}: {var} must be set (its default is the embedded SQLite mode)"
        # The worker command sets DYKAF_WORKER_DEVICE only when it is absent from the environment:
        # an empty value passed by compose would defeat that.
        assert "DYKAF_WORKER_DEVICE" not in env or env["DYKAF_WORKER_DEVICE"], name


def test_no_unknown_dykaf_variables(raw: dict[str, Any]) -> None:
    """A misspelt DYKAF_* in compose or the env example would be silently ignored by the code."""
    code = code_variables()
    in_files = set(re.findall(r"\bDYKAF_[A-Z][A-Z0-9_]*\b", compose_code()))
    in_files |= {n for n in set(env_example()) | set(documented_defaults()) if n.startswith("DYKAF_")}
    assert in_files - code == set()


def test_documented_defaults_are_the_code_defaults(clean_env: pytest.MonkeyPatch) -> None:
    """Setting a variable to the default docker/.env.example shows changes nothing."""
    from server.core.config import Settings

    baseline = Settings.from_env()
    checked = 0
    for name, value in documented_defaults().items():
        if not name.startswith("DYKAF_") or name in {"DYKAF_DATABASE_URL", "DYKAF_BROKER_URL"}:
            continue
        if name in {"DYKAF_DATA_ROOTS"}:
            continue  # a container path, compared with the compose default below
        clean_env.setenv(name, value)
        assert Settings.from_env() == baseline, f"{name}={value} is not the code's default"
        clean_env.delenv(name)
        checked += 1
    assert checked >= 10


def test_settings_seen_by_the_containers(compose: dict[str, Any], clean_env: pytest.MonkeyPatch) -> None:
    """What Settings.from_env() yields inside each service with the example .env."""
    from sqlalchemy.engine import make_url

    from server.core.config import Settings

    services = compose["services"]
    pg_password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    redis_cmd = command(services["redis"])
    redis_password = option_value(redis_cmd, "--requirepass")
    defaults = Settings.from_env()
    for name in APP_SERVICES:
        for var, value in environment(services[name]).items():
            clean_env.setenv(var, value)
        settings = Settings.from_env()
        url = make_url(settings.database_url)
        assert url.drivername == "postgresql+psycopg", name  # psycopg 3 is what the image installs
        url.get_dialect()  # the driver imports
        assert (url.host, url.port, url.database, url.password) == ("postgres", 5432, "dykaf", pg_password)
        assert settings.broker_url == f"redis://:{redis_password}@redis:6379/0", name
        assert settings.data_dir == Path("/data")
        assert settings.checkpoint_root == Path("/data/checkpoints")
        assert not settings.is_sqlite
        # Empty tunables fall back to the code's defaults.
        for field in (
            "visibility_timeout_s",
            "heartbeat_s",
            "stale_after_s",
            "max_runs_per_job",
            "auto_queue",
        ):
            assert getattr(settings, field) == getattr(defaults, field), (name, field)
        from server.jobs import paths

        assert [str(p) for p in paths.data_roots()] == ["/corpora"]
        assert paths.cache_root() == Path("/cache/dykaf-lab")
        # A job may read the corpora volume, never the lab's state or caches.
        assert not paths._is_state(Path("/corpora/shards/train-00000.bin"))
        assert paths._is_state(Path("/data/lab.db")) and paths._is_state(Path("/cache/dykaf-lab/x"))
        for var in environment(services[name]):
            clean_env.delenv(var)
    # Flower talks to the same broker.
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == f"redis://:{redis_password}@redis:6379/0"


def test_visibility_timeout_reaches_celery(compose: dict[str, Any], clean_env: pytest.MonkeyPatch) -> None:
    from server.core.config import Settings
    from server.jobs.publish import celery_config

    env = environment(compose["services"]["worker-gpu0"])
    env["DYKAF_VISIBILITY_TIMEOUT_S"] = "172800"
    for var, value in env.items():
        clean_env.setenv(var, value)
    conf = celery_config(Settings.from_env())
    assert conf["broker_transport_options"]["visibility_timeout"] == 172800
    assert conf["task_acks_late"] and conf["worker_prefetch_multiplier"] == 1


# --- compose: commands against the CLI ----------------------------------------------------------
def cli_options(*path: str) -> set[str]:
    """Options of ``dykaf-lab <path>`` from its --help output (Typer's CliRunner)."""
    from typer.testing import CliRunner

    from worker.cli import app

    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", result.output))


def test_commands_match_the_cli(compose: dict[str, Any]) -> None:
    import typer.main

    from server.jobs.queues import QUEUES
    from worker.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    services = compose["services"]
    for name in APP_SERVICES:
        argv = command(services[name])
        assert argv[0] == "dykaf-lab", name
        assert argv[1] in commands, f"{name}: no such command {argv[1]!r}"
        options = cli_options(argv[1])
        declared = {opt for param in commands[argv[1]].params for opt in param.opts + param.secondary_opts}
        for arg in argv[2:]:
            if arg.startswith("--"):
                opt = arg.split("=", 1)[0]
                assert opt in options and opt in declared, f"{name}: `dykaf-lab {argv[1]}` has no {opt}"
    for name in WORKERS:
        argv = command(services[name])
        assert argv[1] == "worker"
        queues = (option_value(argv, "--queue") or "gpu").split(",")
        assert set(queues) <= set(QUEUES), name
    assert command(services["migrate"])[1] == "migrate"
    assert command(services["api"])[1] == "api"


def test_gpu_workers_own_one_gpu_each(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    services = compose["services"]
    seen_ids: list[str] = []
    hostnames = set()
    for name in GPU_WORKERS:
        svc = services[name]
        argv = command(svc)
        assert option_value(argv, "--queue") == "gpu"
        # Inside the container the one reserved GPU is device 0.
        assert option_value(argv, "--gpu") == "0"
        assert environment(svc)["CUDA_VISIBLE_DEVICES"] == "0"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia"
        assert "gpu" in devices[0]["capabilities"]
        assert "count" not in devices[0], "device_ids and count are mutually exclusive"
        assert len(devices[0]["device_ids"]) == 1
        seen_ids += devices[0]["device_ids"]
        hostnames.add(svc["hostname"])
        assert svc["healthcheck"] == {"disable": True}
        assert svc["restart"] == "unless-stopped"
        assert svc["stop_grace_period"], "a stopping worker needs time to checkpoint"
    assert len(set(seen_ids)) == len(seen_ids) == len(GPU_WORKERS), "two workers on one GPU"
    assert len(hostnames) == len(GPU_WORKERS), "worker names (hostname:pid) must differ"
    # Both come from the x-gpu-worker extension field: everything but hostname and deploy is shared.
    anchor = resolve(raw["x-gpu-worker"], env_example())
    for name in GPU_WORKERS:
        rest = {k: v for k, v in services[name].items() if k not in ("hostname", "deploy")}
        assert rest == anchor, name
    # "Adding a GPU is a few lines": each GPU service block stays short.
    lines = COMPOSE.read_text().splitlines()
    for name in GPU_WORKERS:
        start = lines.index(f"  {name}:")
        block = [line for line in lines[start + 1 :] if line.strip()]
        length = next(i for i, line in enumerate(block) if not line.startswith("    "))
        assert length <= 3, f"{name} takes {length + 1} lines"


def test_node_worker_owns_every_gpu(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    """worker-node: one worker for all GPUs of the machine, the alternative to one per GPU."""
    from worker.worker_plan import plan_worker

    svc = compose["services"]["worker-node"]
    argv = command(svc)
    assert option_value(argv, "--gpus") == "all" and option_value(argv, "--gpu") is None
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == "all" and "device_ids" not in device, "count and device_ids exclude each other"
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # The worker command sets CUDA_VISIBLE_DEVICES to the GPUs it lists; a fixed value would hide them.
    assert "CUDA_VISIBLE_DEVICES" not in environment(svc)
    assert svc["hostname"] not in {compose["services"][name]["hostname"] for name in GPU_WORKERS}
    assert svc["restart"] == "unless-stopped" and svc["stop_grace_period"]
    assert svc["healthcheck"] == {"disable": True}
    assert svc["shm_size"], "NCCL between the GPUs of one run needs shared memory"
    # What that command becomes inside a container that sees four GPUs.
    plan = plan_worker(
        gpus=option_value(argv, "--gpus"), environ=environment(svc), listed=lambda: [0, 1, 2, 3]
    )
    assert plan.queues == ["gpu", "gpu-x2", "gpu-x3", "gpu-x4"]
    assert (plan.pool, plan.concurrency) == ("threads", 4)
    assert plan.env["CUDA_VISIBLE_DEVICES"] == plan.env["DYKAF_WORKER_GPUS"] == "0,1,2,3"
    # The CPU worker offers LAB_CPU_RANKS ranks (1 by default: its queue only).
    cpu = plan_worker(**_worker_options(command(compose["services"]["worker-cpu"])), environ={})
    assert cpu.queues == ["cpu"] and cpu.pool == "solo"


def _worker_options(argv: list[str]) -> dict[str, Any]:
    cpus = option_value(argv, "--cpus")
    return {"queue": option_value(argv, "--queue"), "cpus": int(cpus) if cpus else None}


# --- compose: ordering, health, volumes, ports --------------------------------------------------
def depends(service: Mapping[str, Any]) -> dict[str, str]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return dict.fromkeys(dep, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in dep.items()}


def test_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert depends(services["migrate"]) == {"postgres": "service_healthy"}
    assert services["migrate"]["restart"] == "no"
    api = depends(services["api"])
    assert api["migrate"] == "service_completed_successfully"
    assert api["postgres"] == api["redis"] == "service_healthy"
    for name in WORKERS:
        dep = depends(services[name])
        assert dep["migrate"] == "service_completed_successfully", name
        assert dep["redis"] == "service_healthy", name
    assert depends(services["flower"]) == {"redis": "service_healthy"}
    # Every dependency exists, and the graph has no cycle (a topological order exists).
    order: list[str] = []
    pending = {name: set(depends(svc)) for name, svc in services.items()}
    for deps in pending.values():
        assert deps <= set(services)
    while pending:
        ready = sorted(name for name, deps in pending.items() if deps <= set(order))
        assert ready, f"dependency cycle among {sorted(pending)}"
        order += ready
        for name in ready:
            del pending[name]
    assert order.index("migrate") < order.index("api")
    assert max(order.index("postgres"), order.index("redis")) < order.index("api")


def test_redis_keeps_queued_tasks_across_restarts(raw: dict[str, Any], compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    argv = command(redis)
    assert argv[0] == "redis-server"
    assert option_value(argv, "--appendonly") == "yes"
    assert option_value(argv, "--appendfsync") in ("always", "everysec")
    assert option_value(argv, "--maxmemory-policy") == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF must live on a volume"
    # The reason is written down next to the setting.
    text = COMPOSE.read_text()
    start = text.index("\n  redis:\n")
    comment = text[start : text.index("    command:", start)]
    assert "AOF" in comment and "restart" in comment


def named_volume(spec: str) -> str | None:
    source = spec.split(":", 1)[0]
    return None if source.startswith(("/", ".", "~")) else source


def test_volumes_are_declared_and_shared(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for spec in svc.get("volumes") or []:
            assert isinstance(spec, str), f"{name}: use the short volume syntax"
            source = named_volume(spec)
            if source is not None:
                assert source in declared, f"{name}: volume {source!r} not declared"
    assert any(v.startswith("pg-data:/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    # The checkpoint directory (DYKAF_DATA_DIR=/data) is one storage for the API and every worker:
    # a run requeued from one worker resumes on another from the same checkpoint files.
    data_sources = set()
    for name in ("api", *WORKERS):
        mounts = {spec.split(":")[1]: spec.split(":")[0] for spec in services[name]["volumes"]}
        assert "/data" in mounts, f"{name} does not mount /data"
        data_sources.add(mounts["/data"])
    assert len(data_sources) == 1, data_sources
    # LAB_SHARED_DIR may name a host directory (shared storage) instead of the volume.
    bound = resolve(yaml.safe_load(COMPOSE.read_text()), {**env_example(), "LAB_SHARED_DIR": "/mnt/dykaf"})
    assert "/mnt/dykaf:/data" in bound["services"]["worker-gpu1"]["volumes"]


def test_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api = services["api"]
    argv = command(api)
    port = int(option_value(argv, "--port") or 0)
    assert port == API_CONTAINER_PORT
    assert option_value(argv, "--host") == "0.0.0.0", "the API must listen beyond the container"
    published = [p.rsplit(":", 1) for p in api["ports"]]
    assert [int(container) for _, container in published] == [port]
    assert published[0][0] == "0.0.0.0:8000"
    # The health check probes the same port, on a route the app serves.
    assert api["healthcheck"]["test"][1:] == ["python", "/app/docker/healthcheck.py"]
    from server.api.routes import health

    assert "/healthz" in {route.path for route in health.router.routes}  # type: ignore[attr-defined]
    assert f":{port}/healthz" in (ROOT / "docker" / "healthcheck.py").read_text()
    for name, container in (("postgres", 5432), ("redis", 6379), ("flower", 5555)):
        (spec,) = services[name]["ports"]
        host_ip, _host_port, inner = spec.split(":")
        assert int(inner) == container
        assert host_ip == "127.0.0.1", f"{name} is published on localhost unless configured"
    # Containers reach each other by service name on the default network.
    env = environment(services["api"])
    assert "@postgres:5432/" in env["DYKAF_DATABASE_URL"] and "@redis:6379/" in env["DYKAF_BROKER_URL"]


# --- Dockerfile -------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, line.lstrip("!").strip("/")))
    return patterns


def pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also excludes what lies below it."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for negate, pattern in dockerignore_patterns():
        regex = pattern_regex(pattern)
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            result = not negate
    return result


def json_or_shell(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return [str(x) for x in yaml.safe_load(args)]
    return ["/bin/sh", "-c", args]


def test_dockerfile_base_images_and_user() -> None:
    instr = dockerfile_instructions()
    keywords = [k for k, _ in instr]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else "" for k, a in instr if k == "ARG"}
    # CUDA-capable default, CPU fallback documented, picked with a build arg.
    assert "pytorch/pytorch" in args["BASE_IMAGE"] and "cuda" in args["BASE_IMAGE"]
    assert ("FROM", "${BASE_IMAGE}") in instr
    assert "python:3.11-slim" in DOCKERFILE.read_text()
    assert keywords.index("ARG") < keywords.index("FROM")
    # The compose file builds with the same default base.
    assert f":-{args['BASE_IMAGE']}}}" in COMPOSE.read_text()
    # The project is installed with its lab extra.
    runs = " ".join(a for k, a in instr if k == "RUN")
    assert 'pip install ".[lab]"' in runs
    # Runs as an unprivileged user from the first USER on.
    users = [a for k, a in instr if k == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert "useradd" in runs
    # A health check for the API, and the API port exposed.
    health = next(a for k, a in instr if k == "HEALTHCHECK")
    assert "CMD" in health and "/app/docker/healthcheck.py" in health
    assert ("EXPOSE", str(API_CONTAINER_PORT)) in instr


def copy_map() -> dict[str, str]:
    """Destination path in the image -> source path in the build context, for every COPY."""
    instr = dockerfile_instructions()
    workdir = "/"
    mapping: dict[str, str] = {}
    for keyword, args in instr:
        if keyword == "WORKDIR":
            workdir = args if args.startswith("/") else os.path.join(workdir, args)
        if keyword not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert keyword == "COPY", "use COPY (no remote ADD)"
        *sources, dest = parts
        dest_abs = dest if dest.startswith("/") else os.path.normpath(os.path.join(workdir, dest))
        for src in sources:
            if dest.endswith("/") or len(sources) > 1:
                mapping[os.path.join(dest_abs, Path(src).name)] = src
            else:
                mapping[dest_abs] = src
    return mapping


def test_dockerfile_copy_sources_exist_and_are_in_the_context() -> None:
    mapping = copy_map()
    assert mapping
    for dest, src in mapping.items():
        path = ROOT / src
        assert path.exists(), f"COPY {src} -> {dest}: source missing"
        assert not ignored(src), f"COPY {src}: excluded by .dockerignore"
        if path.is_dir():
            tracked = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            assert tracked, f"COPY {src}: empty directory"
    # What the running service needs is in the image: packages, Alembic scripts, dashboard, docker/.
    sources = set(mapping.values())
    for needed in ("dykaf", "server", "worker", "migrations", "web", "docker", "pyproject.toml"):
        assert needed in sources, f"{needed} is not copied into the image"
    # migrations/ and web/ are found next to the packages (PYTHONPATH=/app is the WORKDIR).
    env = " ".join(a for k, a in dockerfile_instructions() if k == "ENV")
    assert "PYTHONPATH=/app" in env
    assert ("WORKDIR", "/app") in dockerfile_instructions()
    # .dockerignore keeps secrets and local state out of the context.
    for path in (".env", ".venv/bin/python", ".git/HEAD", ".lab/lab.db", "worker/__pycache__/x.pyc"):
        assert ignored(path), f"{path} would be sent to the build context"
    assert not ignored("docker/entrypoint.sh") and not ignored("docker/.env.example")


def test_dockerfile_entrypoint_and_cmd_refer_to_existing_scripts() -> None:
    instr = dockerfile_instructions()
    mapping = copy_map()

    def source_of(image_path: str) -> Path:
        for dest, src in mapping.items():
            if image_path == dest or image_path.startswith(dest.rstrip("/") + "/"):
                return ROOT / src / os.path.relpath(image_path, dest)
        raise AssertionError(f"{image_path} is not copied into the image")

    (entrypoint,) = [json_or_shell(a) for k, a in instr if k == "ENTRYPOINT"]
    script = source_of(entrypoint[0])
    assert script.is_file() and os.access(script, os.X_OK), script
    assert script.read_text().startswith("#!/bin/sh")
    tracked = subprocess.run(
        ["git", "ls-files", "-s", str(script.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True
    ).stdout
    if tracked:  # committed with the executable bit
        assert tracked.startswith("100755"), tracked
    (cmd,) = [json_or_shell(a) for k, a in instr if k == "CMD"]
    assert cmd[:2] == ["dykaf-lab", "api"]
    assert option_value(cmd, "--port") == str(API_CONTAINER_PORT)
    assert option_value(cmd, "--host") == "0.0.0.0"
    for arg in cmd[2:]:
        if arg.startswith("--"):
            assert arg in cli_options("api"), arg
    health = next(a for k, a in instr if k == "HEALTHCHECK")
    assert source_of("/app/docker/healthcheck.py").is_file()
    assert "/app/docker/healthcheck.py" in health
    # The console script the CMD and compose use is declared by the project.
    assert 'dykaf-lab = "worker.cli:app"' in (ROOT / "pyproject.toml").read_text()


# --- the scripts under docker/ -----------------------------------------------------------------
def run_entrypoint(args: list[str], data_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DYKAF_")},
        "DYKAF_DATA_DIR": str(data_dir),
        "DYKAF_CACHE_DIR": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "200",
    }
    return subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def test_entrypoint(tmp_path: Path) -> None:
    script = ROOT / "docker" / "entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    # The subcommands it prefixes with `dykaf-lab` are real commands.
    import typer.main

    from worker.cli import app

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    case_line = next(line for line in script.read_text().splitlines() if "api|worker|" in line)
    assert set(case_line.strip().rstrip(")").split("|")) <= commands
    # Anything else runs unchanged, after the state directories were created.
    data = tmp_path / "data"
    done = run_entrypoint(["sh", "-c", "echo ran"], data, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ran", done.stderr
    assert (data / "checkpoints").is_dir() and (tmp_path / "cache").is_dir()
    # `worker --help` becomes `dykaf-lab worker --help`.
    done = run_entrypoint(["worker", "--help"], data, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--gpu" in done.stdout
    assert not list((data / "checkpoints").iterdir()), "the write probe is removed"
    # A data directory the worker cannot write to stops it at start, with the reason.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    done = run_entrypoint(["worker", "--help"], blocker, tmp_path)
    assert done.returncode == 1 and "not writable" in done.stderr


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_healthcheck_script(http_port: int) -> None:
    script = ROOT / "docker" / "healthcheck.py"

    def probe(url: str) -> int:
        env = {**os.environ, "HEALTHCHECK_URL": url}
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=30)
        return done.returncode

    assert probe(f"http://127.0.0.1:{http_port}/healthz") == 0
    assert probe(f"http://127.0.0.1:{http_port}/other") == 1
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    assert probe(f"http://127.0.0.1:{closed}/healthz") == 1


def test_cluster_doc_covers_the_operations() -> None:
    doc = (ROOT / "docs" / "cluster.md").read_text()
    for needed in (
        "## Running on a cluster",
        "docker compose up",
        "--no-deps",
        "DYKAF_DATABASE_URL",
        "DYKAF_BROKER_URL",
        "DYKAF_VISIBILITY_TIMEOUT_S",
        "NFS",
        "LAB_SHARED_DIR",
        "prefetch",
        "acks",
        "CUDA_VISIBLE_DEVICES",
    ):
        assert needed in doc, f"docs/cluster.md does not mention {needed}"
    # The service names the doc uses exist (worker-gpuN: the doc's example of adding a GPU).
    services = set(yaml.safe_load(COMPOSE.read_text())["services"])
    service_ref = r"`docker compose [^`]*?\b((?:worker|api|migrate|postgres|redis|flower)[\w-]*)"
    named = set(re.findall(service_ref, doc))
    assert {n for n in named if not re.fullmatch(r"worker-gpu\d+", n)} <= services, named
