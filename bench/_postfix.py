"""Debian's Postfix for the benchmarks: installed when missing, and a throw-away instance in its
own config directory on its own port (the system Postfix is never started, stopped or used).

- `ensure_installed()`: `apt-get install -y postfix` (debconf preseeded to "No configuration",
  DEBIAN_FRONTEND=noninteractive) when smtp-source, smtp-sink or postfix is missing.
- `alternate_config_directories()`: `postfix -c DIR` refuses a DIR that the default instance's
  main.cf does not list in alternate_config_directories; this adds PFBASE/inst.* for the time of
  the benchmark (of all benchmarks running at once) and puts /etc/postfix/main.cf back as it was
  afterwards (or removes it, when there was none).
- `Postfix(...)`: a fresh instance under PFBASE/inst.XXXX: main.cf has only the settings in
  `self.settings` (Postfix's defaults otherwise, fsync on), master.cf is the system's with the
  port-25 smtpd replaced by one on 127.0.0.1:<free port>. `stop()` stops it and removes the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.harness import free_port, wait_banner

PFBASE = "/tmp/pfbench"
SBIN = "/usr/sbin"
MAIN_CF = Path("/etc/postfix/main.cf")
TOOLS = ("postfix", "postconf", "smtp-source", "smtp-sink")
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


def tool(name: str) -> str:
    """The path of a Postfix program (they live in /usr/sbin, often not on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path=SBIN) or name


def missing_tools() -> list[str]:
    return [t for t in TOOLS if not (shutil.which(t) or shutil.which(t, path=SBIN))]


def ensure_installed() -> None:
    """Install Debian's postfix package when one of its programs is missing (as root)."""
    if not missing_tools():
        return
    print(f"installing postfix (missing: {', '.join(missing_tools())})", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input="postfix postfix/main_mailer_type select No configuration\n",
                   text=True, check=True, env=env)
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"], check=True, env=env,
                   stdin=subprocess.DEVNULL)
    if missing_tools():
        raise RuntimeError(f"postfix installed, but still missing: {', '.join(missing_tools())}")


def postconf(*args: str) -> str:
    p = subprocess.run([tool("postconf"), *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"postconf {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def version() -> str:
    try:
        return postconf("-h", "mail_version").strip()
    except (RuntimeError, OSError):
        return "?"


@contextlib.contextmanager
def alternate_config_directories():
    """List PFBASE/inst.* in the default instance's alternate_config_directories while the block
    runs; then put /etc/postfix/main.cf back as it was (or remove it, when there was none).

    Several benchmarks may run at once: the first one in saves main.cf (PFBASE/main.cf.orig, or
    the marker PFBASE/main.cf.absent), each registers its pid under PFBASE/users, and the last one
    out restores it. A save left by a benchmark that was killed is kept, so it is restored too."""
    users = Path(PFBASE, "users")
    users.mkdir(parents=True, exist_ok=True)
    os.chmod(PFBASE, 0o755)
    me = users / str(os.getpid())
    with _locked():
        if not _live_users(users):
            _save_main_cf()
            cur = postconf("-h", "alternate_config_directories").strip() if MAIN_CF.exists() else ""
            want = f"{PFBASE}/inst.*"
            if want not in cur.replace(",", " ").split():
                if not MAIN_CF.exists():    # debconf's "No configuration": postconf edits no missing main.cf
                    MAIN_CF.write_text("")
                postconf("-e", f"alternate_config_directories = {(cur + ' ' + want).strip()}")
        me.touch()
    try:
        yield
    finally:
        with _locked():
            me.unlink(missing_ok=True)
            if not _live_users(users):
                _restore_main_cf()


SAVED, ABSENT = Path(PFBASE, "main.cf.orig"), Path(PFBASE, "main.cf.absent")


def _save_main_cf() -> None:
    if SAVED.exists() or ABSENT.exists():
        return                  # a killed benchmark's save: the real original
    if MAIN_CF.exists():
        shutil.copy2(MAIN_CF, SAVED)
        st = MAIN_CF.stat()
        os.chown(SAVED, st.st_uid, st.st_gid)
    else:
        ABSENT.touch()


def _restore_main_cf() -> None:
    if SAVED.exists():
        shutil.copy2(SAVED, MAIN_CF)
        st = SAVED.stat()
        os.chown(MAIN_CF, st.st_uid, st.st_gid)
        SAVED.unlink()
    elif ABSENT.exists():
        MAIN_CF.unlink(missing_ok=True)
        ABSENT.unlink()


def _live_users(users: Path) -> list[str]:
    live = []
    for f in users.iterdir():
        try:
            os.kill(int(f.name), 0)
            live.append(f.name)
        except (ValueError, ProcessLookupError):
            f.unlink(missing_ok=True)
        except PermissionError:
            live.append(f.name)
    return live


@contextlib.contextmanager
def _locked():
    with open(f"{PFBASE}/lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _raise(e: OSError):
    raise e


class Postfix:
    """A throw-away Postfix relaying everything to [RELAY_HOST]:RELAY_PORT (TRANSPORT maps a
    domain to another next hop), with SETTINGS added to main.cf."""

    def __init__(self, relay_host: str, relay_port: int, transport: dict[str, str] | None = None,
                 settings: dict[str, str] | None = None):
        os.makedirs(PFBASE, exist_ok=True)
        os.chmod(PFBASE, 0o755)
        self.dir = tempfile.mkdtemp(prefix="inst.", dir=PFBASE)
        os.chmod(self.dir, 0o755)
        self.etc = f"{self.dir}/etc"
        self.queue = f"{self.dir}/queue"
        self.maillog = f"{self.dir}/maillog"
        self.port = free_port()
        shutil.copytree("/etc/postfix", self.etc, symlinks=True)
        if not os.path.exists(f"{self.etc}/master.cf"):
            shutil.copy("/usr/share/postfix/master.cf.dist", f"{self.etc}/master.cf")
        data = f"{self.dir}/data"
        os.makedirs(self.queue)
        os.makedirs(data)
        shutil.chown(data, "postfix", "postfix")
        with open(f"{self.etc}/transport", "w") as f:
            f.writelines(f"{dom} {nexthop}\n" for dom, nexthop in (transport or {}).items())
        self.settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": data,
            "myhostname": "pf.bench.test",
            "inet_interfaces": "127.0.0.1",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "local_transport": "error:no local delivery",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[{relay_host}]:{relay_port}",
            "transport_maps": f"texthash:{self.etc}/transport",
            "smtp_bind_address": "127.0.0.2",
            "smtputf8_enable": "no",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": f"/var, /dev/stdout, {PFBASE}",
            "multi_instance_name": "postfix-bench",
            **(settings or {}),
        }
        # main.cf: only these settings; Postfix's defaults for everything else.
        Path(f"{self.etc}/main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.settings.items()))
        c = ["-c", self.etc]
        postconf(*c, "-M#", "smtp/inet")
        self.smtpd_service = f"127.0.0.1:{self.port} inet n - n - - smtpd"
        postconf(*c, "-M", f"127.0.0.1:{self.port}/inet={self.smtpd_service}")
        postconf(*c, "-F", "*/*/chroot = n")
        self.start()

    def start(self) -> None:
        with open(f"{self.dir}/start.log", "ab") as log:
            subprocess.run([tool("postfix"), "-c", self.etc, "start"], stdout=log, stderr=log,
                           stdin=subprocess.DEVNULL, timeout=60)
        if wait_banner("127.0.0.1", self.port, 20):
            return
        why = self.log_tail()
        self.stop()
        raise RuntimeError(f"postfix did not start:\n{why}")

    def log_tail(self, n: int = 3000) -> str:
        out = []
        for name in (f"{self.dir}/start.log", self.maillog):
            with contextlib.suppress(OSError):
                out.append(Path(name).read_text(errors="replace")[-n:])
        return "\n".join(out)

    def master_pid(self) -> int:
        return int(Path(f"{self.queue}/pid/master.pid").read_text().split()[0])

    def queued(self) -> int:
        """Messages in the queue (every queue file in maildrop, incoming, active, deferred, hold)."""
        try:
            return sum(len(files) for q in QUEUES for _, _, files in os.walk(f"{self.queue}/{q}", onerror=_raise))
        except PermissionError:     # a root without CAP_DAC_OVERRIDE: ask Postfix's showq instead
            p = subprocess.run([tool("postqueue"), "-c", self.etc, "-j"], capture_output=True, text=True)
            return len(p.stdout.splitlines())

    def log_counts(self, needles: tuple[str, ...]) -> dict[str, int]:
        """How often each of NEEDLES occurs in the mail log so far."""
        try:
            text = Path(self.maillog).read_text(errors="replace")
        except OSError:
            text = ""
        return {n: text.count(n) for n in needles}

    def stop(self) -> None:
        try:
            master = self.master_pid()
        except (OSError, ValueError):
            master = None
        subprocess.run([tool("postfix"), "-c", self.etc, "stop"], capture_output=True, timeout=60)
        deadline = time.time() + 10
        while master and time.time() < deadline:
            try:
                os.kill(master, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            if master:      # `postfix stop` refused (e.g. main.cf already restored): stop our master directly
                with contextlib.suppress(OSError):
                    os.kill(master, signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)
