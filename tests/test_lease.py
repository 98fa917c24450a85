"""transforms/lease.py: one writer per table, on local disk."""

from __future__ import annotations

import contextlib
import json
import threading
import time

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
