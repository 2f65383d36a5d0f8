"""master: the spool lock, and the master giving up on a worker that cannot live."""

import os

import pytest

from poolmta import master


def test_a_second_gateway_on_the_same_spool_is_refused_naming_the_first(tmp_path):
    held = master.lock_spool(str(tmp_path))
    try:
        with pytest.raises(master.SpoolBusy, match=f"pid {os.getpid()}"):
            master.lock_spool(str(tmp_path), wait=0.3)
    finally:
        held.close()
    master.lock_spool(str(tmp_path), wait=0.3).close()        # free again once the first is gone


def test_a_worker_that_keeps_dying_at_once_stops_the_master(monkeypatch):
    monkeypatch.setattr(master, "RESTART_DELAY", 0.01)
    starts = []

    def worker(number, ready):
        ready()
        return 3                                           # dies right after saying ready

    code = master.run(1, worker, on_ready=lambda: starts.append(1))
    assert code == 1 and starts == [1]
