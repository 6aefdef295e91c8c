"""The device allocator of a worker (all-or-nothing, first come first served), checked with real
threads, and the parsing of ``--gpus``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.core.config import Settings
from worker.devices import (
    AcquireStopped,
    DevicePool,
    listed_gpus,
    node_devices,
    node_pool,
    parse_gpus,
    parse_nvidia_smi_list,
)

LIVENESS_S = 20.0  # only a guard against a hung test, never a speed check


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + LIVENESS_S
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


class Holder(threading.Thread):
    """A thread that acquires ``n`` devices, reports them, and holds them until ``release`` is set."""

    def __init__(self, pool: DevicePool, n: int, stop: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.pool, self.n, self.stop = pool, n, stop
        self.got: list[str] | None = None
        self.error: BaseException | None = None
        self.acquired = threading.Event()
        self.release = threading.Event()

    def run(self) -> None:
        try:
            with self.pool.acquire(self.n, stop=self.stop) as devices:
                self.got = devices
                self.acquired.set()
                assert self.release.wait(LIVENESS_S)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.release.set()
        self.join(LIVENESS_S)
        assert not self.is_alive()


def test_acquire_hands_out_distinct_devices_and_always_gives_them_back() -> None:
    pool = DevicePool(["0", "1", "2", "3"])
    with pool.acquire(2) as first:
        assert first == ["0", "1"] and pool.free == 2
        with pool.acquire(2) as second:
            assert second == ["2", "3"] and pool.free == 0
    assert pool.free == 4
    with pytest.raises(RuntimeError, match="boom"), pool.acquire(3):
        assert pool.free == 1
        raise RuntimeError("boom")
    assert pool.free == 4  # released on error too
    for n in (0, 5):  # could never be served: refused at once, nothing taken
        with pytest.raises(ValueError, match="this worker has 4"), pool.acquire(n):
            pass
    assert pool.free == 4 and pool.waiting == 0
    with pytest.raises(ValueError, match="distinct"):
        DevicePool(["0", "0"])
    with pytest.raises(ValueError, match="at least one"):
        DevicePool([])


def test_a_request_waits_until_all_it_needs_are_free() -> None:
    pool = DevicePool(["0", "1", "2", "3"])
    a = Holder(pool, 3)
    a.start()
    assert a.acquired.wait(LIVENESS_S)
    b = Holder(pool, 2)
    b.start()
    until(lambda: pool.waiting == 1)
    # One device is free, but B needs two: it takes nothing meanwhile (all or nothing).
    assert not b.acquired.is_set() and pool.free == 1
    a.finish()
    assert b.acquired.wait(LIVENESS_S)
    assert b.got is not None and len(b.got) == 2 and pool.free == 2
    b.finish()
    assert pool.free == 4 and a.error is None and b.error is None


def test_requests_are_served_in_arrival_order() -> None:
    """A 4-device run waiting for a busy pool is not overtaken by a 1-device run arriving later."""
    pool = DevicePool(["0", "1", "2", "3"])
    small = Holder(pool, 3)
    small.start()
    assert small.acquired.wait(LIVENESS_S)
    big = Holder(pool, 4)
    big.start()
    until(lambda: pool.waiting == 1)
    late = Holder(pool, 1)
    late.start()
    until(lambda: pool.waiting == 2)
    assert pool.free == 1 and not late.acquired.is_set()  # a device is free, but big came first
    small.finish()
    assert big.acquired.wait(LIVENESS_S) and big.got == ["0", "1", "2", "3"]
    assert not late.acquired.is_set()
    big.finish()
    assert late.acquired.wait(LIVENESS_S)
    late.finish()
    assert [h.error for h in (small, big, late)] == [None, None, None] and pool.free == 4


def test_competing_runs_never_share_a_device_and_never_deadlock() -> None:
    """Runs of sizes 1-3 on a 4-device pool, many rounds from six threads: every run gets its
    devices (no deadlock), and no device is ever held by two runs at once."""
    pool = DevicePool([f"cpu{i}" for i in range(4)])
    in_use: set[str] = set()
    guard = threading.Lock()
    clashes: list[tuple[str, ...]] = []
    done: list[int] = []
    start = threading.Barrier(6)

    def worker(seed: int) -> None:
        start.wait()
        for round_ in range(60):
            n = 1 + (seed + round_) % 3
            with pool.acquire(n) as devices:
                with guard:
                    if in_use & set(devices):
                        clashes.append(tuple(devices))
                    in_use.update(devices)
                time.sleep(0)  # let the others run while the devices are held
                with guard:
                    in_use.difference_update(devices)
            with guard:
                done.append(n)

    threads = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LIVENESS_S * 3)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert clashes == [] and len(done) == 6 * 60 and pool.free == 4 and pool.waiting == 0


def test_a_stopped_request_gives_up_and_lets_the_next_one_through() -> None:
    pool = DevicePool(["0", "1"])
    holder = Holder(pool, 1)
    holder.start()
    assert holder.acquired.wait(LIVENESS_S)
    stop = threading.Event()
    stopped = Holder(pool, 2, stop=stop)  # first in line, needs both
    stopped.start()
    until(lambda: pool.waiting == 1)
    behind = Holder(pool, 1)  # needs the free one, but waits behind the first request
    behind.start()
    until(lambda: pool.waiting == 2)
    assert not behind.acquired.is_set()
    stop.set()  # the worker shuts down: the waiting run gives up ...
    stopped.join(LIVENESS_S)
    assert isinstance(stopped.error, AcquireStopped) and stopped.got is None
    assert behind.acquired.wait(LIVENESS_S)  # ... and the next request is served
    behind.finish()
    holder.finish()
    assert pool.free == 2 and pool.waiting == 0


def test_node_pool_is_one_per_process_and_follows_the_settings() -> None:
    gpus = Settings(worker_gpus="2,5")
    assert node_devices(gpus) == ["2", "5"]
    assert node_pool(gpus) is node_pool(Settings(worker_gpus="2,5", heartbeat_s=9.0))
    assert node_pool(gpus).size == 2
    cpus = Settings(worker_cpu_ranks=3)
    assert node_devices(cpus) == ["cpu0", "cpu1", "cpu2"] and node_pool(cpus).size == 3
    assert node_devices(Settings()) == ["cpu0"]


NVIDIA_SMI_L = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1c2d3e-aaaa-bbbb-cccc-000000000000)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1c2d3e-aaaa-bbbb-cccc-000000000001)
  MIG 1g.10gb     Device  0: (UUID: MIG-11111111-2222-3333-4444-555555555555)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1c2d3e-aaaa-bbbb-cccc-000000000002)
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", [0]),
        ("0-7", list(range(8))),
        ("0,2,5", [0, 2, 5]),
        (" 6, 0-3 ", [0, 1, 2, 3, 6]),
        ("all", [0, 1, 2]),
        ("ALL", [0, 1, 2]),
    ],
)
def test_gpus_option(text: str, expected: list[int]) -> None:
    assert parse_gpus(text, listed=lambda: parse_nvidia_smi_list(NVIDIA_SMI_L)) == expected


@pytest.mark.parametrize("text", ["", "a", "0-", "3-1", "0,0", "0-2,1", "1;2", "-1", "0-64"])
def test_bad_gpus_option_is_named(text: str) -> None:
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus(text, listed=lambda: [0])


def test_gpus_all_asks_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``listed_gpus`` runs ``nvidia-smi -L`` from PATH (a stand-in script here)."""
    path = os.environ.get("PATH", "")
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "nvidia-smi"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot run nvidia-smi"):
        listed_gpus()  # not on PATH
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{path}")
    script.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 2\ncat <<'EOF'\n{NVIDIA_SMI_L}EOF\n")
    script.chmod(0o755)
    assert listed_gpus() == [0, 1, 2] and parse_gpus("all") == [0, 1, 2]
    script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    with pytest.raises(ValueError, match=r"lists no GPU \(exit 9: NVIDIA-SMI has failed"):
        parse_gpus("all")
    assert parse_nvidia_smi_list("No devices were found\n") == []
