"""master - run several worker processes that share the listen port and the spool

One Python event loop uses one core at most; Postfix runs many smtpd and
smtp processes under its master(8). With ``server.workers`` > 1, ``poolmta
serve`` forks that many workers before anything else starts (no thread, no
event loop yet: a clean fork). Each worker is a whole gateway (app.serve):

- it listens on the same port with SO_REUSEPORT, so the kernel spreads the
  incoming connections over the workers;
- it writes to the same spool file (SQLite serialises the writers; each
  worker still group-commits its own batch and fsyncs before every 250);
- it delivers only its own shard of the queue (spool/sqlite.py): the mail
  it accepted, and its DSNs, so a fresh message leaves from the process
  that took it, with no hand-off and no two workers on one recipient;
- its queue ids carry its number (spool/store.py), so they never collide.

The master only supervises: it reserves the port when ``listen`` asks for
port 0 (bound with SO_REUSEPORT, not listening, so the workers share it),
waits until every worker is listening, forwards SIGTERM/SIGINT, and
restarts a worker that dies (after RESTART_DELAY: its shard's mail waits on
disk meanwhile, nothing is lost). A worker that dies before it ever listened
(a port taken, a bad key) stops the whole start-up with its exit status.

SEE ALSO: app.py (serve), spool/sqlite.py (shards), cli.py (serve)
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable

log = logging.getLogger("poolmta.master")

RESTART_DELAY = 1.0        # seconds before a crashed worker is started again (no hot crash loop)
QUICK_DEATHS = 5           # a worker that dies this many times in a row, each within QUICK seconds of
QUICK = 10.0               # its start, will not live: the master stops (its shard's mail waits on disk)
LOCK_WAIT = 30.0           # how long `serve` waits for an earlier gateway on the same spool to finish


class SpoolBusy(Exception):
    """Another poolmta serve still runs on this server.data_dir."""


def lock_spool(data_dir: str, wait: float = LOCK_WAIT):
    """Hold DATA_DIR/poolmta.lock (flock) for as long as this process and its workers
    live: two gateways on one spool would deliver the same shards twice (SO_REUSEPORT
    lets a second one bind the port). Waits up to WAIT seconds for a previous gateway
    whose workers are still finishing (a master killed with SIGKILL leaves them up to
    their shutdown grace); then raises SpoolBusy naming the holder's pid."""
    import fcntl
    path = os.path.join(data_dir, "poolmta.lock")
    f = open(path, "a+")
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            if time.monotonic() >= deadline:
                f.close()
                raise SpoolBusy(f"another poolmta serve (pid {holder}) is using {data_dir}") from None
            if not told:
                log.warning("waiting for the poolmta serve (pid %s) still using %s", holder, data_dir)
                told = True
            time.sleep(0.1)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core);
    a worker's threads (spool writer and reader, sender state, DKIM signing) then
    held some 250 MiB after a few thousand messages, in fragments of freed memory.
    Two arenas keep a worker near 60 MiB. Called before any thread exists; an explicit
    MALLOC_ARENA_MAX in the environment wins; a no-op off glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-8, arenas)            # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def worker_count(configured: int) -> int:
    """``server.workers``: 0 means one per CPU this process may run on (at most 16)."""
    if configured > 0:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:                  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def reserve_port(host: str) -> socket.socket:
    """A port for all workers when the configuration says port 0: bound with
    SO_REUSEPORT and kept open (not listening) until the master exits."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, 0))
    return s


def run(workers: int, worker_main: Callable[[int, Callable[[], None]], int],
        on_ready: Callable[[], None] | None = None) -> int:
    """Fork ``workers`` processes running ``worker_main(number, ready)``, where
    ``ready()`` tells the master the worker is listening; supervise them until
    SIGTERM/SIGINT; return the exit status for ``poolmta serve``."""
    children: dict[int, int] = {}                 # pid -> worker number
    pending: dict[int, int] = {}                  # read end of a worker's ready pipe -> pid
    stopping = False

    master_pid = os.getpid()
    started: dict[int, float] = {}                # worker number -> when it was last started
    quick_deaths: dict[int, int] = {}

    def spawn(number: int) -> None:
        r, w = os.pipe()
        # No SIGTERM between fork() and the bookkeeping below: a worker the master
        # does not know of would be neither stopped nor waited for.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        pid = os.fork()
        if pid == 0:                              # the worker
            os.close(r)
            _die_with_master()
            if os.getppid() != master_pid:        # the master died before prctl took effect
                os._exit(1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            code = 1
            try:
                def ready() -> None:
                    try:
                        os.write(w, b"1")
                        os.close(w)
                    except OSError:               # a restarted worker: nobody reads any more
                        pass
                code = worker_main(number, ready)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(w)
        children[pid] = number
        pending[r] = pid
        started[number] = time.monotonic()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def stop_all(signum=None, frame=None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for n in range(workers):
        spawn(n)
    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)

    # Start-up: every worker listening, or the first one to die takes the start-up down.
    while pending and not stopping:
        for r, pid in list(pending.items()):
            got = os.read(r, 1)                   # b"" when the worker exited without saying ready
            os.close(r)
            del pending[r]
            if not got and stopping:
                continue
            if not got:
                _, status = os.waitpid(pid, 0)
                children.pop(pid, None)
                code = os.waitstatus_to_exitcode(status)
                log.error("worker %d exited during start-up (status %d)", pid, code)
                stop_all()
                _reap(children)
                return code if code > 0 else 1
    if on_ready and not stopping:
        on_ready()

    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        number = children.pop(pid, None)
        if number is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            if code not in (0, -signal.SIGTERM):
                exit_code = 1
            continue
        quick_deaths[number] = quick_deaths.get(number, 0) + 1 if time.monotonic() - started[number] < QUICK else 1
        if quick_deaths[number] >= QUICK_DEATHS:
            log.error("worker %d (pid %d) died with status %d, %d times in a row within %.0fs of its start;"
                      " stopping", number, pid, code, quick_deaths[number], QUICK)
            stop_all()
            _reap(children)
            return 1
        log.error("worker %d (pid %d) died with status %d; starting it again in %.0fs",
                  number, pid, code, RESTART_DELAY)
        time.sleep(RESTART_DELAY)
        if not stopping:
            spawn(number)
            # A restarted worker reports ready through its pipe; nobody needs to wait for it.
            for r in list(pending):
                os.close(r)
            pending.clear()
    return exit_code


def _die_with_master() -> None:
    """Ask Linux to send this worker SIGTERM when the master dies (even by SIGKILL),
    so no orphan keeps the port and the spool; elsewhere a no-op."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)                 # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _reap(children: dict[int, int]) -> None:
    for pid in list(children):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        children.pop(pid, None)
