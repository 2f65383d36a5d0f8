"""assess.spam against the real engines: SpamAssassin's spamd and rspamd, started on loopback.

The tests start their own daemons as subprocesses (Debian packages `spamd`,
`spamassassin` and `rspamd`), never the packaged services:

* spamd: ``-L`` (local tests only: no DNS blocklists, no Razor/Pyzor/DCC),
  loopback port of its own, ``-x`` (no per-user configuration), a site
  configuration of its own in a throw-away directory (the Debian ``*.pre``
  plugin lists, plus Bayes off), ``-u nobody`` when run as root (spamd will
  not check mail as root), waited for until it answers PING.
* rspamd: the packaged configuration (/etc/rspamd) with a local override
  directory of our own: only the normal worker, on a loopback port (no
  controller, proxy or fuzzy worker), logging to the console, its DNS pointed
  at a test DNS server on loopback that answers NXDOMAIN to everything (every
  DNS list says "not listed", quickly, and nothing leaves the machine), no
  Redis (so no Bayes, greylisting or rate limits). rspamd compiles its
  Hyperscan databases at the first start (about 20 s here); they are kept in
  a cache directory for the next runs (``hs_cache_dir``, see
  ``rspamd_hs_cache()``), where it starts in under a second.

What is asserted, per engine: GTUBE is spam (spamd: score >= 1000 of 5.0),
a corpus ham is not, a 20 + 20 sample of the SpamAssassin corpus
(tests/data/spam) is judged with precision >= 0.9, the engine is chosen by the
tenant's spam_engine through assess.spam.check, and an engine that is down
(connection refused) or hung (a real socket that never answers) gives a
failed fact, quickly or after spam.timeout, with the tenant's
on_engine_failure, never an exception. The protocol details (the request
spamd and rspamd get, truncation to max_size, error answers, header
injection) are checked against small fake servers on real sockets.

Nothing is installed here: the binaries must be there (.ci/run installs the
packages). If one is missing, its tests fail and say so.
The full 200 + 200 measurement is bench/spam_corpus.py, which starts its
daemons with the helpers below.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from poolmta.assess import Context
from poolmta.assess import spam
from poolmta.assess.spam_engines import EngineError, rspamd, spamd
from poolmta.config import SpamConfig, loads
from poolmta.model import Envelope, Message, Origin, Recipient
from poolmta.tenancy import Directory
from tests.support.configs import POOLS

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "spam"
GTUBE_MSG = (b"From: alice@contoso.test\r\nTo: bob@example.org\r\nSubject: test\r\n"
             b"Message-ID: <gtube.1@contoso.test>\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n\r\n"
             b"This is the GTUBE, the\r\nGeneric Test for Unsolicited Bulk Email\r\n\r\n"
             + spam.GTUBE + b"\r\n")


def crlf(path: Path) -> bytes:
    """A corpus file as the gateway holds it: no mbox 'From ' line, CRLF line ends."""
    raw = path.read_bytes()
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def sample(kind: str) -> list[Path]:
    return sorted((DATA / kind).glob("*.eml"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    if not path:
        pytest.fail(f"{name} is not installed: these interoperability tests need the real daemon."
                    f" Install the Debian package(s) {package} (apt-get install {package}; .ci/run does).",
                    pytrace=False)
    return path


def _stop(proc: subprocess.Popen) -> None:
    """Stop a daemon we started in its own session: it and its children (by its process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _spamd_pong(port: int) -> bool:
    """Sync (the bench calls it from inside a running event loop): PING -> PONG?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
            c.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return b"PONG" in c.recv(100)
    except OSError:
        return False


def _rspamd_pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
            c.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := c.recv(4096):
                answer += chunk
            return answer.startswith(b"HTTP/1.1 200") and b"pong" in answer
    except OSError:
        return False


def _wait_until(proc: subprocess.Popen, ready, seconds: float, log: Path, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if ready():
            return
        time.sleep(0.1)
    _stop(proc)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    pytest.fail(f"{what} did not answer within {seconds:.0f} s (exit {proc.returncode}):\n{tail}", pytrace=False)


# ---- spamd ------------------------------------------------------------------------------------------------

class Spamd:
    """A spamd of our own on 127.0.0.1:port: ``with Spamd() as d: d.address``."""

    def __init__(self, children: int = 4, startup: float = 90.0):
        self.children, self.startup = children, startup
        self.binary = _binary("spamd", "spamd spamassassin")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.dir = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Spamd":
        self.dir = tempfile.mkdtemp(prefix="poolmta-spamd-")
        site = Path(self.dir) / "site"
        site.mkdir()
        for pre in glob.glob("/etc/spamassassin/*.pre"):     # the plugin lists (loadplugin lines)
            shutil.copy(pre, site)
        (site / "local.cf").write_text("use_bayes 0\nbayes_auto_learn 0\nskip_rbl_checks 1\n")
        for p in (Path(self.dir), site, *site.iterdir()):  # readable by the unprivileged children
            p.chmod(0o755 if p.is_dir() else 0o644)
        self.port = free_port()
        cmd = [self.binary, "-L", "-x", "-p", str(self.port), "-i", "127.0.0.1", "-A", "127.0.0.1",
               "-m", str(self.children), "--min-children", "1", f"--siteconfigpath={site}",
               f"--helper-home-dir={self.dir}", "-s", "stderr", "--pidfile", str(Path(self.dir) / "spamd.pid")]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        log = Path(self.dir) / "spamd.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.dir,
                                         start_new_session=True)
        _wait_until(self.proc, lambda: _spamd_pong(self.port), self.startup, log, "spamd")
        return self

    def stop(self) -> None:
        if self.proc:
            _stop(self.proc)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---- rspamd -----------------------------------------------------------------------------------------------

def rspamd_hs_cache(user: str | None) -> str:
    """A directory for rspamd's compiled Hyperscan databases that outlives the test run, so only
    the first start on a machine pays for the compilation. It must be ours (or the rspamd user's)
    and writable by nobody else; otherwise a fresh one (a cold start) is used."""
    uid = pwd.getpwnam(user).pw_uid if user else os.geteuid()
    path = Path(tempfile.gettempdir()) / f"poolmta-rspamd-hs-cache-{os.geteuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (uid, os.geteuid()) or st.st_mode & 0o022:
            raise PermissionError(f"{path} is not ours")
        if st.st_uid != uid:
            os.chown(path, uid, -1)
        return str(path)
    except OSError:
        return tempfile.mkdtemp(prefix="poolmta-rspamd-hs-")


class Rspamd:
    """An rspamd normal worker of our own on 127.0.0.1:port: ``with Rspamd(dns) as r: r.url``."""

    def __init__(self, nameserver: str, startup: float = 120.0):
        self.nameserver, self.startup = nameserver, startup
        self.binary = _binary("rspamd", "rspamd")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.dir = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Rspamd":
        user = "_rspamd" if os.geteuid() == 0 else None
        try:
            pwd.getpwnam("_rspamd")
        except KeyError:
            user = None
        self.dir = tempfile.mkdtemp(prefix="poolmta-rspamd-")
        d = Path(self.dir)
        for sub in ("local/local.d", "local/override.d", "db", "run", "log"):
            (d / sub).mkdir(parents=True)
        self.port = free_port()
        closed = free_port()
        ov = d / "local" / "override.d"
        (ov / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n')
        for w in ("controller", "proxy", "fuzzy"):
            (ov / f"worker-{w}.inc").write_text(f'bind_socket = "127.0.0.1:{closed}";\ncount = -1;\n')
        (ov / "logging.inc").write_text('type = "console";\nlevel = "warning";\n')
        hs = rspamd_hs_cache(user)
        (d / "local" / "local.d" / "options.inc").write_text(
            f'hs_cache_dir = "{hs}";\n'
            f'dns {{ nameserver = ["{self.nameserver}"]; timeout = 1s; retransmits = 1; }}\n')
        for p in d.rglob("*"):
            p.chmod(0o777 if p.is_dir() else 0o644)
        d.chmod(0o755)
        cmd = [self.binary, "-f", "-c", "/etc/rspamd/rspamd.conf", f"--var=LOCAL_CONFDIR={d / 'local'}",
               f"--var=DBDIR={d / 'db'}", f"--var=RUNDIR={d / 'run'}", f"--var=LOGDIR={d / 'log'}"]
        if user:
            cmd += ["-u", user, "-g", user]
        elif os.geteuid() == 0:
            cmd += ["--insecure"]
        log = d / "rspamd.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.dir,
                                         start_new_session=True)
        t0 = time.monotonic()
        _wait_until(self.proc, lambda: _rspamd_pong(self.port), self.startup, log, "rspamd")
        self.started_in = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc:
            _stop(self.proc)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---- fixtures and helpers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spamd_daemon():
    with Spamd() as d:
        yield d


@pytest.fixture(scope="module")
def nxdomain_dns():
    from tests.support.dnsserver import TestDNSServer
    with TestDNSServer({}) as dns:
        yield dns


@pytest.fixture(scope="module")
def rspamd_daemon(nxdomain_dns):
    with Rspamd(nxdomain_dns.nameserver) as r:
        yield r


TENANTS = """
[tenants.sa]
accepted_domains = ["contoso.test"]
spam_engine = "spamassassin"
on_engine_failure = "defer"
[tenants.rs]
accepted_domains = ["fabrikam.test"]
spam_engine = "rspamd"
on_engine_failure = "high-risk"
[tenants.bi]
accepted_domains = ["tailspin.test"]
"""


def context(spam_cfg: SpamConfig) -> Context:
    return Context(resolver=None, directory=Directory(loads(POOLS + TENANTS)), spam=spam_cfg)


def message(content: bytes, tenant: str = "sa", auth_user: str = "alice@contoso.test") -> Message:
    return Message("Q1", Envelope("alice@contoso.test", (Recipient("bob@example.org"),)),
                   Origin("192.0.2.10", "client.contoso.test", auth_user, tenant), content, time.time())


async def judge(check, paths: list[Path], concurrency: int = 4) -> tuple[list[bool], float]:
    """Verdicts on the files (in order) and the wall time, checked `concurrency` at a time."""
    sem = asyncio.Semaphore(concurrency)

    async def one(p):
        async with sem:
            return (await check(crlf(p))).is_spam
    t0 = time.monotonic()
    verdicts = await asyncio.gather(*(one(p) for p in paths))
    return list(verdicts), time.monotonic() - t0


def precision_recall(ham: list[bool], spam_: list[bool]) -> tuple[float, float]:
    tp, fp = sum(spam_), sum(ham)
    return (tp / (tp + fp) if tp + fp else 1.0), tp / len(spam_)


@contextlib.asynccontextmanager
async def hung_server():
    """A real TCP server that accepts, reads, and never answers."""
    conns = []

    async def handle(reader, writer):
        conns.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
            await asyncio.sleep(3600)
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in conns:
            w.close()
        server.close()


@contextlib.asynccontextmanager
async def fake_server(answer: bytes, requests: list[bytes], read_until_eof: bool = True):
    """A real TCP server that records what it is sent (until EOF, or one HTTP request) and answers `answer`."""

    async def handle(reader, writer):
        if read_until_eof:
            data = await reader.read(-1)
        else:
            head = await reader.readuntil(b"\r\n\r\n")
            n = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")), 0)
            data = head + await reader.readexactly(n)
        requests.append(data)
        writer.write(answer)
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


# ---- spamd: the real one ----------------------------------------------------------------------------------

async def test_spamd_ping(spamd_daemon):
    assert await spamd.ping(spamd_daemon.address)
    assert not await spamd.ping(f"127.0.0.1:{free_port()}")


async def test_spamd_gtube_is_spam(spamd_daemon):
    f = await spamd.check(GTUBE_MSG, spamd_daemon.address, timeout=30)
    assert f.is_spam and f.engine == "spamassassin"
    assert f.score >= 1000 and f.threshold == 5.0
    assert "GTUBE" in f.detail.split(": ", 1)[1].split(",")


async def test_spamd_ham_is_not_spam(spamd_daemon):
    f = await spamd.check(crlf(sample("ham")[0]), spamd_daemon.address, timeout=30)
    assert not f.is_spam and f.score < f.threshold == 5.0, f


async def test_spamd_sample_precision(spamd_daemon):
    check = lambda c: spamd.check(c, spamd_daemon.address, timeout=60)
    ham, _ = await judge(check, sample("ham"))
    spam_, _ = await judge(check, sample("spam"))
    precision, recall = precision_recall(ham, spam_)
    assert precision >= 0.9, (precision, recall, ham)
    assert recall >= 0.5, (precision, recall, spam_)    # what it must at least find (bench: the full figures)


async def test_check_picks_spamassassin_for_the_tenant(spamd_daemon):
    ctx = context(SpamConfig(spamd=spamd_daemon.address, timeout=30))
    f = await spam.check(message(GTUBE_MSG, "sa"), ctx)
    assert (f.is_spam, f.engine, f.failed, f.on_failure) == (True, "spamassassin", False, "defer")
    assert f.score >= 1000 and 0 < f.elapsed < 30
    # a tenant on builtin does not ask spamd; a message without a (known) tenant neither
    for tenant in ("bi", "", "nosuchtenant"):
        g = await spam.check(message(GTUBE_MSG, tenant), ctx)
        assert (g.is_spam, g.engine, g.on_failure) == (True, "gtube", "normal")


async def test_spamd_truncates_like_spamc_s(spamd_daemon):
    # GTUBE past max_size is not seen; the detail says the message was cut
    big = GTUBE_MSG.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + b"filler line of the body\r\n" * 2000 + spam.GTUBE + b"\r\n"
    f = await spamd.check(big, spamd_daemon.address, timeout=30, max_size=8192)
    assert not f.is_spam and f"of {len(big)} bytes" in f.detail
    assert (await spamd.check(big, spamd_daemon.address, timeout=30, max_size=len(big))).is_spam


# ---- spamd: down, hung, odd answers -----------------------------------------------------------------------

async def test_spamd_down_fails_quickly():
    ctx = context(SpamConfig(spamd=f"127.0.0.1:{free_port()}", timeout=5))
    t0 = time.monotonic()
    f = await spam.check(message(GTUBE_MSG, "sa"), ctx)
    assert (f.is_spam, f.failed, f.engine, f.on_failure) == (False, True, "spamassassin", "defer")
    assert "connection refused" in f.detail
    assert time.monotonic() - t0 < 1 and f.elapsed < 1


async def test_spamd_hung_fails_after_the_timeout():
    async with hung_server() as port:
        ctx = context(SpamConfig(spamd=f"127.0.0.1:{port}", timeout=0.5))
        f = await spam.check(message(GTUBE_MSG, "sa"), ctx)
    assert (f.is_spam, f.failed, f.on_failure) == (False, True, "defer")
    assert "timed out" in f.detail and 0.5 <= f.elapsed < 1.5


async def test_spamd_request_and_error_answers():
    reqs: list[bytes] = []
    ok = b"SPAMD/1.1 0 EX_OK\r\nContent-length: 9\r\nSpam: False ; 1.5 / 5.0\r\n\r\nSYM_A,SYM"
    async with fake_server(ok, reqs) as port:
        f = await spamd.check(b"Subject: x\r\n\r\nline one\r\nline two\r\n", f"127.0.0.1:{port}", max_size=24)
    assert (f.is_spam, f.score, f.threshold) == (False, 1.5, 5.0) and "SYM_A,SYM" in f.detail
    # cut at the last line end within max_size, and Content-length says so
    assert reqs[0] == b"SYMBOLS SPAMC/1.5\r\nContent-length: 24\r\n\r\nSubject: x\r\n\r\nline one\r\n"
    for answer, why in ((b"SPAMD/1.0 76 Bad header line: (Content-length mismatch)\r\n\r\n", "spamd error 76"),
                        (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n", "no Spam header"),
                        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a spamd answer"),
                        (b"", "without an answer")):
        async with fake_server(answer, []) as port:
            with pytest.raises(EngineError, match=why):
                await spamd.check(b"Subject: x\r\n\r\nbody\r\n", f"127.0.0.1:{port}")
            f = await spam.check(message(b"Subject: x\r\n\r\nbody\r\n", "sa"),
                                 context(SpamConfig(spamd=f"127.0.0.1:{port}")))
            assert f.failed and why in f.detail


def test_spamd_addresses():
    assert spamd.parse_address("127.0.0.1:783") == ("127.0.0.1", 783)
    assert spamd.parse_address("[::1]:7830") == ("::1", 7830)
    assert spamd.parse_address("spamd.internal") == ("spamd.internal", 783)
    assert spamd.parse_address("unix:/run/spamd.sock") == "/run/spamd.sock"
    for bad in ("", "host:x", "host:70000"):
        with pytest.raises(EngineError):
            spamd.parse_address(bad)


# ---- rspamd: the real one ---------------------------------------------------------------------------------

async def test_rspamd_ping(rspamd_daemon):
    assert await rspamd.ping(rspamd_daemon.url)
    assert not await rspamd.ping(f"http://127.0.0.1:{free_port()}")


async def test_rspamd_gtube_is_spam(rspamd_daemon):
    f = await rspamd.check(GTUBE_MSG, rspamd_daemon.url, timeout=30)
    assert f.is_spam and f.engine == "rspamd" and "rspamd reject" in f.detail and "GTUBE" in f.detail


async def test_rspamd_ham_is_not_spam(rspamd_daemon):
    f = await rspamd.check(crlf(sample("ham")[0]), rspamd_daemon.url, timeout=30)
    assert not f.is_spam, f


async def test_rspamd_sample_precision(rspamd_daemon):
    # judged as the gateway asks for an SMTP AUTH submission: with the User (rspamd then skips
    # the inbound-only checks, which the test DNS would answer "no such host" to) and the client IP
    check = lambda c: rspamd.check(c, rspamd_daemon.url, timeout=60, user="alice@contoso.test", ip="192.0.2.10")
    ham, _ = await judge(check, sample("ham"))
    spam_, _ = await judge(check, sample("spam"))
    precision, recall = precision_recall(ham, spam_)
    assert precision >= 0.9, (precision, recall, ham)
    assert recall >= 0.4, (precision, recall, spam_)


async def test_check_picks_rspamd_for_the_tenant(rspamd_daemon):
    ctx = context(SpamConfig(rspamd_url=rspamd_daemon.url, timeout=30))
    f = await spam.check(message(GTUBE_MSG, "rs"), ctx)
    assert (f.is_spam, f.engine, f.failed, f.on_failure) == (True, "rspamd", False, "high-risk")
    assert 0 < f.elapsed < 30


# ---- rspamd: down, hung, odd answers, the request ---------------------------------------------------------

async def test_rspamd_down_and_hung_fail():
    ctx = context(SpamConfig(rspamd_url=f"http://127.0.0.1:{free_port()}", timeout=5))
    f = await spam.check(message(GTUBE_MSG, "rs"), ctx)
    assert (f.is_spam, f.failed, f.on_failure) == (False, True, "high-risk") and "connection refused" in f.detail
    assert f.elapsed < 1
    async with hung_server() as port:
        f = await spam.check(message(GTUBE_MSG, "rs"),
                             context(SpamConfig(rspamd_url=f"http://127.0.0.1:{port}", timeout=0.5)))
    assert f.failed and "timed out" in f.detail and 0.5 <= f.elapsed < 1.5


def _http(status: str, body: bytes, chunked: bool = False) -> bytes:
    if chunked:
        mid = len(body) // 2
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:mid], body[mid:]) if c) + b"0\r\n\r\n"
        return f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + framed
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def test_rspamd_request_and_answers():
    reply = json.dumps({"action": "add header", "score": 7.5, "required_score": 15.0,
                        "symbols": {"A": {"score": 1.0}, "B": {"score": 6.5}}}).encode()
    for chunked in (False, True):
        reqs: list[bytes] = []
        async with fake_server(_http("200 OK", reply, chunked), reqs, read_until_eof=False) as port:
            f = await rspamd.check(b"Subject: x\r\n\r\nbody\r\n", f"http://127.0.0.1:{port}/prefix/",
                                   ip="192.0.2.10", helo="evil\r\nX-Injected: 1", mail_from="a@contoso.test",
                                   rcpts=["b@example.org", "c@example.org"], queue_id="Q1", user="alice")
        assert (f.is_spam, f.score, f.threshold) == (True, 7.5, 15.0)
        assert f.detail.startswith("rspamd add header 7.5/15: B,A")
        head, _, body = reqs[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /prefix/checkv2 HTTP/1.1" and body == b"Subject: x\r\n\r\nbody\r\n"
        for want in (b"IP: 192.0.2.10", b"Helo: evilX-Injected: 1", b"From: <a@contoso.test>",
                     b"Rcpt: <b@example.org>", b"Rcpt: <c@example.org>", b"Queue-Id: Q1", b"User: alice",
                     b"Content-Length: 20"):
            assert want in lines, (want, lines)
        assert not any(line.startswith(b"X-Injected") for line in lines)
    odd = json.dumps({"action": "no action", "score": 0, "required_score": 15,
                      "symbols": {"A": {"score": "x"}, "B": [1], "C": None}}).encode()
    async with fake_server(_http("200 OK", odd), [], read_until_eof=False) as port:
        assert not (await rspamd.check(b"x\r\n", f"http://127.0.0.1:{port}")).is_spam
    for action, is_spam in (("no action", False), ("greylist", False), ("soft reject", False),
                            ("rewrite subject", True), ("reject", True)):
        body = json.dumps({"action": action, "score": 1, "required_score": 15}).encode()
        async with fake_server(_http("200 OK", body), [], read_until_eof=False) as port:
            assert (await rspamd.check(b"x\r\n", f"http://127.0.0.1:{port}")).is_spam is is_spam
    for answer, why in ((_http("500 Internal Server Error", b'{"error":"oops"}'), "HTTP 500: oops"),
                        (_http("200 OK", b"not json"), "without an action"),
                        (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "not an HTTP answer")):
        async with fake_server(answer, [], read_until_eof=False) as port:
            f = await spam.check(message(b"Subject: x\r\n\r\nbody\r\n", "rs"),
                                 context(SpamConfig(rspamd_url=f"http://127.0.0.1:{port}")))
            assert f.failed and not f.is_spam and why in f.detail, f.detail
    with pytest.raises(EngineError, match="bad rspamd URL"):
        await rspamd.check(b"x", "ftp://127.0.0.1:1")


# ---- any engine: the trusted upstream verdict comes first -------------------------------------------------

async def test_trusted_upstream_verdict_whatever_the_engine():
    content = b"X-Spam-Flag: YES\r\nSubject: t\r\n\r\nbody\r\n"
    ctx = context(SpamConfig(spamd=f"127.0.0.1:{free_port()}"))    # spamd down: not asked at all
    m = Message("Q2", Envelope("a@contoso.test", (Recipient("b@example.org"),)),
                Origin("10.0.0.5", "relay", "", "sa", "exchange", True), content, time.time())
    f = await spam.check(m, ctx)
    assert (f.is_spam, f.engine, f.failed, f.on_failure) == (True, "upstream", False, "defer")
