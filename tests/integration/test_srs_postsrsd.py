"""rewrite.srs against the real PostSRSd (Debian package `postsrsd`, version 1.x).

The test starts its own postsrsd as a subprocess: loopback only, two free
ports of its own (never the packaged service's 10001/10002), its own secret
file and a domain no real configuration uses, in the foreground, without
systemd. It speaks Postfix's TCP table protocol to it (`get KEY` ->
`200 value` / `500 reason`, keys and values %-encoded) and checks that

* we mint byte for byte what postsrsd mints (standard base64 setting; the
  base64url setting differs only in the hash's `+` `/` -> `-` `_`);
* postsrsd reverses the addresses we mint, and we reverse the addresses it mints,
  SRS0 and SRS1, in any letter case;
* both refuse forgeries and agree on the validity window to the day (day 21
  valid, day 22 expired), and on secret rotation (first line signs, all verify);
* what does *not* interoperate, precisely: postsrsd 1.x refuses base64url
  hashes (so it cannot reverse the roughly one in eight of our base64url-minted
  addresses whose hash holds a `-` or `_`), and refuses a stamp from tomorrow,
  which we accept (skew_days=1).

Nothing is installed here: the binary must be there (.ci/run installs the
package). If it is missing, the test fails and says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time

import pytest

from poolmta.clock import FakeClock, SystemClock
from poolmta.rewrite.srs import SRS, SRSBadHash, SRSExpired

DAY = 86400
DOMAIN = "srs-interop.poolmta.test"                  # no packaged postsrsd is configured with this
SECRETS = ("interop-first-secret-0123", "interop-second-secret-4567")
TO_URL = str.maketrans("+/", "-_")

SENDERS = [
    "alice@sender.example",
    "Bob.Smith+tag@Sender.Example",
    "o'brien=x@sub.sender.example",
    "100%sure@sender.example",                        # %-encoded on the wire
    "jörg@sender.example",                            # UTF-8 local part
    "test@" + "a" * 400 + ".example",
    "SRS0=opaque+string@hop1.example",                # second hop: SRS0 -> SRS1
    "SRS1=X=hop0.example==opaque+string@hop1.example",  # third hop: SRS1 re-signed
]


def expected_reverse(sender: str) -> str:
    """What reversing the rewritten sender gives: the sender, or for an SRS0/SRS1
    sender the first hop's SRS0 address."""
    local, _, domain = sender.rpartition("@")
    if local.upper().startswith("SRS0"):
        return sender
    if local.upper().startswith("SRS1"):
        _, host, opaque = local[5:].split("=", 2)
        return f"SRS0{opaque}@{host}"
    return sender


def find_postsrsd() -> str:
    path = shutil.which("postsrsd") or next(
        (p for p in ("/usr/sbin/postsrsd", "/usr/local/sbin/postsrsd") if os.access(p, os.X_OK)), None)
    if not path:
        pytest.fail("postsrsd is not installed: this interoperability test needs the real daemon."
                    " Install the Debian package 'postsrsd' (apt-get install postsrsd; .ci/run does).", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode(key: str) -> bytes:
    # Postfix tcp_table: every octet that is not a printable ASCII character, and '%', as %XX.
    return b"".join(bytes([b]) if 0x21 <= b <= 0x7E and b != 0x25 else b"%%%02x" % b
                    for b in key.encode("utf-8", "surrogateescape"))


def _decode(text: bytes) -> str:
    return re.sub(rb"%([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), text).decode("utf-8", "surrogateescape")


class TcpTable:
    """One persistent connection to a postsrsd lookup port."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def get(self, key: str) -> tuple[int, str]:
        self.sock.sendall(b"get " + _encode(key) + b"\n")
        line = self.file.readline().rstrip(b"\r\n")
        assert line, "postsrsd closed the connection"
        code, _, value = line.partition(b" ")
        return int(code), _decode(value)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Daemon:
    def __init__(self, proc: subprocess.Popen, fport: int, rport: int, version: str):
        self.proc, self.version = proc, version
        self._f, self._r = TcpTable(fport), TcpTable(rport)

    def forward(self, address: str) -> tuple[int, str]:
        return self._f.get(address)

    def reverse(self, address: str) -> tuple[int, str]:
        return self._r.get(address)

    def close(self) -> None:
        self._f.close()
        self._r.close()


def _few_fds() -> None:
    # postsrsd 1.10 closes every descriptor up to the open-files limit at start-up
    # (fixed upstream in 1.12): keep that limit small so a container's huge one costs nothing.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), min(1024, hard) if hard != resource.RLIM_INFINITY else 1024))


@pytest.fixture(scope="module")
def postsrsd(tmp_path_factory):
    binary = find_postsrsd()
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout.strip()
    if not version.startswith("1."):
        pytest.fail(f"postsrsd {version!r}: this test speaks the TCP table protocol of postsrsd 1.x"
                    " (Debian 12's 1.10); 2.x serves a socketmap instead", pytrace=False)
    tmp = tmp_path_factory.mktemp("postsrsd")
    secret_file = tmp / "postsrsd.secret"
    secret_file.write_text("".join(s + "\n" for s in SECRETS))
    secret_file.chmod(0o600)
    log = open(tmp / "postsrsd.log", "w+b")
    proc = None
    for _ in range(5):                                   # a port taken between free_port() and bind: try again
        fport, rport = free_port(), free_port()
        if fport == rport or {fport, rport} & {10001, 10002}:
            continue
        proc = subprocess.Popen([binary, f"-s{secret_file}", f"-d{DOMAIN}", "-l127.0.0.1", "-4",
                                 f"-f{fport}", f"-r{rport}", "-t60"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=tmp,
                                start_new_session=True, preexec_fn=_few_fds)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", rport), timeout=1):
                with socket.create_connection(("127.0.0.1", fport), timeout=1):
                    break
            time.sleep(0.05)
        else:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(5)
            proc = None
            continue
        break
    if proc is None:
        log.seek(0)
        pytest.fail(f"could not start postsrsd {version}: {log.read().decode(errors='replace')}", pytrace=False)
    daemon = Daemon(proc, fport, rport, version)
    try:
        yield daemon
    finally:
        daemon.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)       # its own session: the daemon and its per-connection children
        proc.wait(10)
        log.close()


def ours(alphabet: str = "base64", clock=None, secrets=SECRETS) -> SRS:
    return SRS(DOMAIN, secrets, clock=clock or SystemClock(), hash_alphabet=alphabet,
               keep_foreign_srs1=True)    # postsrsd re-signs foreign SRS1 (libsrs2)


def same_day(fn):
    """Run fn so that it does not straddle a UTC midnight (postsrsd reads its own clock)."""
    for _ in range(3):
        day = int(time.time() // DAY)
        result = fn()
        if int(time.time() // DAY) == day:
            return result
    raise AssertionError("could not finish within one UTC day")


def upper(s: str) -> str:
    # ASCII only: the hash covers ASCII-folded fields (C tolower), so an MTA that
    # changes the case of a UTF-8 letter changes the address for everyone.
    return "".join(c.upper() if c.isascii() else c for c in s)


def lower(s: str) -> str:
    return "".join(c.lower() if c.isascii() else c for c in s)


def hash_of(address: str) -> str:
    return address.split("=")[1]


# ---- tests ------------------------------------------------------------------------------

def test_the_daemon_answering_is_the_one_we_started(postsrsd):
    assert postsrsd.proc.poll() is None
    code, value = postsrsd.forward("alice@sender.example")
    assert code == 200 and value.endswith("@" + DOMAIN), value
    assert ours().reverse(value) == "alice@sender.example"      # signed with our secret file


def test_we_mint_byte_for_byte_what_postsrsd_mints(postsrsd):
    def run():
        std, url = ours("base64"), ours("base64url")
        for sender in SENDERS:
            code, theirs = postsrsd.forward(sender)
            assert code == 200, (sender, theirs)
            assert std.forward(sender) == theirs, sender
            h = hash_of(theirs)
            assert url.forward(sender) == theirs.replace(f"={h}=", "=" + h.translate(TO_URL) + "=", 1), sender
    same_day(run)


def test_senders_in_our_domain_are_left_alone_by_both(postsrsd):
    for sender in (f"carol@{DOMAIN}", f"Carol@{DOMAIN.upper()}"):
        assert postsrsd.forward(sender) == (200, sender)
        assert ours().forward(sender) == sender


@pytest.mark.parametrize("alphabet", ["base64", "base64url"])
def test_postsrsd_reverses_what_we_mint(postsrsd, alphabet):
    srs = ours(alphabet)
    checked = 0
    for sender in SENDERS:
        minted = same_day(lambda: srs.forward(sender))
        if alphabet == "base64url" and set(hash_of(minted)) & set("-_"):
            continue                                        # the one known difference: test below
        for variant in (minted, lower(minted), upper(minted)):
            code, value = postsrsd.reverse(variant)
            assert code == 200, (variant, value)
            want = expected_reverse(sender)
            assert lower(value) == lower(want) and (variant != minted or value == want), (variant, value)
        checked += 1
    assert checked >= len(SENDERS) // 2


@pytest.mark.parametrize("alphabet", ["base64", "base64url"])
def test_we_reverse_what_postsrsd_mints(postsrsd, alphabet):
    srs = ours(alphabet)
    for sender in SENDERS:
        code, minted = postsrsd.forward(sender)
        assert code == 200
        assert srs.reverse(minted) == expected_reverse(sender)
        assert lower(srs.reverse(lower(minted))) == lower(expected_reverse(sender))
        assert lower(srs.reverse(upper(minted))) == lower(expected_reverse(sender))


def test_base64url_hashes_are_what_postsrsd_1x_cannot_reverse(postsrsd):
    url, std = ours("base64url"), ours("base64")
    found = 0
    for i in range(400):
        sender = f"user{i}@sender.example"
        a_url, a_std = same_day(lambda: (url.forward(sender), std.forward(sender)))
        if not set(hash_of(a_url)) & set("-_"):
            continue
        assert postsrsd.reverse(a_url) == (500, "Hash invalid in SRS address.")
        assert postsrsd.reverse(a_std) == (200, sender)
        assert url.reverse(a_url) == url.reverse(a_std) == sender
        found += 1
        if found == 5:
            break
    assert found == 5


def test_validity_window_agrees_to_the_day(postsrsd):
    now = time.time()
    # We mint as if 21 and 22 days ago: postsrsd honours the first, not the second.
    def minted(days_ago: float) -> str:
        return ours(clock=FakeClock(now - days_ago * DAY)).forward("alice@sender.example")
    assert same_day(lambda: postsrsd.reverse(minted(21))) == (200, "alice@sender.example")
    assert same_day(lambda: postsrsd.reverse(minted(22))) == (500, "Time stamp out of date.")
    # postsrsd mints today: we honour it 21 days later, not 22.
    code, theirs = postsrsd.forward("alice@sender.example")
    assert code == 200
    assert ours(clock=FakeClock(now + 21 * DAY)).reverse(theirs) == "alice@sender.example"
    with pytest.raises(SRSExpired):
        ours(clock=FakeClock(now + 22 * DAY)).reverse(theirs)


def test_a_stamp_from_tomorrow_we_take_postsrsd_does_not(postsrsd):
    now = time.time()
    tomorrow = same_day(lambda: ours(clock=FakeClock(now + DAY)).forward("alice@sender.example"))
    assert ours().reverse(tomorrow) == "alice@sender.example"           # skew_days=1
    assert postsrsd.reverse(tomorrow) == (500, "Time stamp out of date.")
    strict = SRS(DOMAIN, SECRETS, clock=SystemClock(), skew_days=0)
    with pytest.raises(SRSExpired):
        strict.reverse(tomorrow)


def test_secret_rotation_agrees(postsrsd):
    # postsrsd signs with its file's first line and verifies with every line: so do we.
    rotated = ours(secrets=(SECRETS[1], SECRETS[0]))
    code, theirs = postsrsd.forward("alice@sender.example")
    assert code == 200 and rotated.reverse(theirs) == "alice@sender.example"
    mine = same_day(lambda: rotated.forward("alice@sender.example"))
    assert mine != theirs
    assert postsrsd.reverse(mine) == (200, "alice@sender.example")
    stranger = ours(secrets=("a-secret-postsrsd-never-saw",))
    mine = same_day(lambda: stranger.forward("alice@sender.example"))
    assert postsrsd.reverse(mine) == (500, "Hash invalid in SRS address.")
    with pytest.raises(SRSBadHash):
        stranger.reverse(theirs)


def test_both_refuse_forgeries_and_non_srs(postsrsd):
    code, theirs = postsrsd.forward("alice@sender.example")
    forged = theirs.replace("=alice@", "=mallory@")
    assert postsrsd.reverse(forged) == (500, "Hash invalid in SRS address.")
    with pytest.raises(SRSBadHash):
        ours().reverse(forged)
    assert postsrsd.reverse("alice@sender.example") == (500, "Not an SRS address.")
