"""Settings: one class, ``DYKAF_<FIELD>`` for every field, ``env()`` as its exact inverse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.core.config import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("DYKAF_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_field_has_its_variable() -> None:
    names = Settings.env_names()
    assert set(names) == set(Settings.model_fields)
    assert names["stale_after_s"] == "DYKAF_STALE_AFTER_S" and names["data_roots"] == "DYKAF_DATA_ROOTS"


def test_env_round_trips_through_from_env(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    """A child process handed ``env()`` builds the same settings (every field away from its default)."""
    changed = Settings(
        data_dir=tmp_path / "lab",
        database_url="postgresql://u@h/db",
        broker_url="redis://h:6379/1",
        broker_key_prefix="p:",
        data_roots=(tmp_path / "a", tmp_path / "b"),
        cache_dir=tmp_path / "cache",
        max_runs_per_job=7,
        max_body_bytes=1000,
        reads_require_key=True,
        write_rate_per_min=7.5,
        heartbeat_s=0.5,
        stale_after_s=5.0,
        reconcile_every_s=1.5,
        visibility_timeout_s=99,
        flush_every_points=11,
        flush_every_s=0.3,
        max_points_per_series=123,
        default_points_per_series=45,
        read_cache_entries=3,
        live_read_ttl_s=0.0,
        auto_queue="cpu",
        worker_device="cpu",
        worker_gpus="0,2,5",
        worker_cpu_ranks=3,
        max_devices_per_run=4,
        worker_seen_s=60.0,
        reconcile=False,
    )
    defaults = Settings()
    assert [name for name in Settings.model_fields if getattr(changed, name) == getattr(defaults, name)] == []
    for name, value in changed.env().items():
        clean_env.setenv(name, value)
    assert Settings.from_env() == changed


def test_empty_variables_mean_the_default_and_bad_ones_are_named(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DYKAF_HEARTBEAT_S", "")
    clean_env.setenv("DYKAF_WORKER_DEVICE", "")
    settings = Settings.from_env()
    assert settings.heartbeat_s == Settings().heartbeat_s and settings.worker_device is None
    clean_env.setenv("DYKAF_RECONCILE", "maybe")
    with pytest.raises(ValidationError, match="reconcile"):
        Settings.from_env()


def test_building_directly_reads_no_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DYKAF_STALE_AFTER_S", "1.0")
    assert Settings().stale_after_s == 30.0
    assert Settings.from_env().stale_after_s == 1.0
    assert Settings.from_env(stale_after_s=2.0).stale_after_s == 2.0  # explicit overrides win


def test_data_roots_split_on_the_path_separator(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DYKAF_DATA_ROOTS", os.pathsep.join(["/data/a", "", "~/b"]))
    assert Settings.from_env().data_roots == (Path("/data/a"), Path("~/b").expanduser())


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="max_steps"):
        Settings(max_steps=5)  # type: ignore[call-arg]


def test_worker_devices_are_checked_and_named(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DYKAF_WORKER_GPUS", " 3, 0 ,12")
    settings = Settings.from_env()
    assert settings.worker_gpus == "3,0,12" and settings.gpu_indices == (3, 0, 12)
    assert Settings().gpu_indices == () and Settings().worker_cpu_ranks == 1
    for bad in ("0,0", "a", "0-3", "1,,2", "-1"):
        with pytest.raises(ValidationError, match="worker_gpus"):
            Settings(worker_gpus=bad)
    for field, value in (("worker_cpu_ranks", 0), ("max_devices_per_run", 0), ("worker_seen_s", 0.0)):
        with pytest.raises(ValidationError, match=field):
            Settings(**{field: value})
    assert Settings().max_devices_per_run is None and "DYKAF_MAX_DEVICES_PER_RUN" not in Settings().env()


def test_device_cap_is_the_job_contracts() -> None:
    from server.core.config import MAX_DEVICES
    from server.jobs.spec import MAX_DEVICES_PER_RUN

    assert MAX_DEVICES == MAX_DEVICES_PER_RUN
