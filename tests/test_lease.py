"""transforms/lease.py: one writer per table, on local disk: acquire, renew, release, expiry, a
lease held by another run, and races between runs."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import pytest

from transforms import lease as leases


def test_only_one_of_many_simultaneous_runs_gets_the_lease(tmp_path):
    for trial in range(5):
        out = tmp_path / f"t{trial}"
        barrier = threading.Barrier(6)
        won, refused = [], []

        def take(i, out=out, barrier=barrier, won=won, refused=refused):
            barrier.wait()
            try:
                won.append(leases.acquire(str(out), f"run{i}"))
            except leases.LeaseHeld:
                refused.append(i)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 5
        assert json.loads((out / leases.LEASE_FILE).read_text())["run_id"] == won[0].run_id


def test_simultaneous_takeovers_of_a_dead_lease_leave_one_holder(tmp_path):
    out = tmp_path / "t"
    leases.acquire(str(out), "dead", expiry_s=0.1)
    time.sleep(0.2)
    barrier = threading.Barrier(4)
    won = []

    def take(i):
        barrier.wait()
        with contextlib.suppress(leases.LeaseHeld):
            won.append(leases.acquire(str(out), f"run{i}", expiry_s=60))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].check()


class _Clock:
    """Stands in for the lease module's ``time``: the test says what time it is."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(leases, "time", fake)
    return fake


def test_acquire_records_the_holder_and_release_gives_it_back(tmp_path, clock):
    out = tmp_path / "t"
    held = leases.acquire(str(out), "r1", expiry_s=60)
    record = leases.read_lease(str(out))
    assert (record["run_id"], record["pid"], record["expiry_s"]) == ("r1", os.getpid(), 60)
    assert record["age_s"] == 0.0
    held.check()
    held.release()
    assert leases.read_lease(str(out)) is None
    assert not (out / leases.LEASE_FILE).exists()
    held.release()  # idempotent


def test_a_live_lease_is_refused_until_it_expires(tmp_path, clock):
    out = str(tmp_path / "t")
    first = leases.acquire(out, "r1", expiry_s=60)
    clock.now = 1060.0  # exactly the expiry: still live
    with pytest.raises(leases.LeaseHeld, match=r"run r1 on .* \(pid \d+\), last renewed 60 s ago"):
        leases.acquire(out, "r2", expiry_s=60)
    clock.now = 1060.5
    second = leases.acquire(out, "r2", expiry_s=60)
    assert leases.read_lease(out)["run_id"] == "r2"
    with pytest.raises(leases.LeaseLost, match=r"run r1 no longer holds .*now: run r2"):
        first.check()
    second.check()


def test_a_renewed_lease_stays_live_and_its_heartbeat_goes_with_a_takeover(tmp_path, clock):
    out = str(tmp_path / "t")
    held = leases.acquire(out, "r1", expiry_s=60)
    clock.now = 1050.0
    held.renew()
    clock.now = 1110.0
    assert leases.read_lease(out)["age_s"] == 60.0  # since the heartbeat, not the acquisition
    with pytest.raises(leases.LeaseHeld):
        leases.acquire(out, "r2", expiry_s=60)
    clock.now = 1111.0
    leases.acquire(out, "r2", expiry_s=60)
    assert not os.path.exists(held.heartbeat_uri())


def test_renew_if_due_renews_at_most_every_quarter_of_the_expiry(tmp_path, clock):
    held = leases.acquire(str(tmp_path / "t"), "r1", expiry_s=40)

    def beat() -> float:
        return json.loads(open(held.heartbeat_uri()).read())["time"]

    held.renew_if_due()
    assert beat() == 1000.0
    clock.now = 1009.9
    held.renew_if_due()
    assert beat() == 1000.0
    clock.now = 1010.0
    held.renew_if_due()
    assert beat() == 1010.0


def test_break_lease_takes_a_live_lease_and_the_loser_releases_nothing(tmp_path, clock):
    out = str(tmp_path / "t")
    loser = leases.acquire(out, "r1", expiry_s=60)
    leases.acquire(out, "r2", expiry_s=60, break_lease=True)
    loser.release()
    assert leases.read_lease(out)["run_id"] == "r2"


def test_holding_renews_in_the_block_and_releases_after(tmp_path, clock):
    out = str(tmp_path / "t")
    held = leases.acquire(out, "r1", expiry_s=60)
    with leases.holding(held):
        assert os.path.exists(held.heartbeat_uri())
        assert leases.read_lease(out)["run_id"] == "r1"
    assert leases.read_lease(out) is None and not os.path.exists(held.heartbeat_uri())


@pytest.mark.parametrize("expiry_s", [0, -1])
def test_the_expiry_must_be_positive(tmp_path, expiry_s):
    with pytest.raises(ValueError, match="the lease expiry must be > 0 s"):
        leases.acquire(str(tmp_path / "t"), "r1", expiry_s=expiry_s)
    assert not (tmp_path / "t").exists()
