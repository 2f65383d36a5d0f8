"""config - every setting poolmta reads, declared once with its default and its doc

Settings live in one TOML file. Each section is a frozen dataclass whose fields
carry their default and a ``doc`` (the way Postfix's mail_params.h and
postconf.proto declare every parameter once). Loading walks the dataclasses,
converts values, and rejects any key it does not know, naming the key and its
line; ``check()`` then looks across sections for settings that contradict each
other (as Postfix's qmgr_post_init does) and returns every problem it finds.

TRUST: the file is operator input; every value is validated before use.

CONFIG: all of them; ``poolmta config check FILE`` prints the problems.

SEE ALSO: cli.py (config check, hash-password), examples/poolmta.toml
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import Pool, Role, Source


def _doc(text: str, **kw: Any) -> dict:
    return {"doc": text, **kw}


class ConfigError(Exception):
    """A setting that cannot be loaded; ``problems`` names each bad key."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    severity: str = "error"          # "error" | "warning"
    line: int = 0
    file: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file and self.line else (f"{self.file}: " if self.file else "")
        return f"{where}{self.severity}: {self.key}: {self.message}"


# ---- value parsers ---------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "30s", "15m", "5d"."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"not a duration (use seconds or e.g. \"30s\", \"15m\", \"4h\", \"5d\"): {value!r}")


_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[bB]?\s*$")


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string such as "25M"."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]
    raise ValueError(f"not a size (use bytes or e.g. \"25M\"): {value!r}")


def parse_hostport(value: Any, default_port: int) -> tuple[str, int]:
    """ "127.0.0.1:5353", "[::1]:25", "::1" or "10.0.0.1" → (host, port)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"not an address: {value!r}")
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        port = int(p)
    else:
        host, port = value, default_port
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return host, port


def _ip(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


def _network(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("not an address or CIDR")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"not an address or CIDR: {value!r}") from None


_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _hostname(value: Any) -> str:
    if not isinstance(value, str) or not _HOSTNAME.match(value):
        raise ValueError(f"not a host name: {value!r}")
    return value.rstrip(".").lower()


def _domain(value: Any) -> str:
    return _hostname(value)


def _address(value: Any) -> str:
    if not isinstance(value, str) or value.count("@") != 1:
        raise ValueError(f"not a mail address (local@domain): {value!r}")
    local, _, domain = value.rpartition("@")
    if not local or any(c in local for c in " <>\"(),;:\\[]"):
        raise ValueError(f"not a mail address (local@domain): {value!r}")
    return f"{local}@{_domain(domain)}"


# ---- sections --------------------------------------------------------------

@dataclass(frozen=True)
class ServerConfig:
    listen: str = field(default="127.0.0.1:2525", metadata=_doc(
        "Address and port the SMTP listener binds, \"host:port\" or \"[v6]:port\"."))
    hostname: str = field(default="poolmta.localhost", metadata=_doc(
        "Our host name: the greeting, Received headers, DSN Reporting-MTA.", parse=_hostname))
    data_dir: str = field(default="/var/spool/poolmta", metadata=_doc(
        "Directory of the spool (SQLite) and trace; created if missing."))
    max_message_size: int = field(default=36_700_160, metadata=_doc(
        "Largest message accepted, in bytes (SIZE and DATA); over it: 552 5.3.4.", parse=parse_size))
    max_recipients: int = field(default=500, metadata=_doc(
        "Most recipients per message; further RCPTs get 452 4.5.3."))
    max_hops: int = field(default=50, metadata=_doc(
        "Most Received headers a message may carry; more means a mail loop: 554 5.4.6 (Postfix's hopcount_limit)."))
    tls_cert: str = field(default="", metadata=_doc(
        "PEM certificate chain for STARTTLS; empty = STARTTLS not offered."))
    tls_key: str = field(default="", metadata=_doc("PEM private key for tls_cert."))
    auth_plaintext_loopback: bool = field(default=False, metadata=_doc(
        "Offer AUTH without TLS to clients connecting from a loopback address (testing, local submission)."))
    timeout: float = field(default=300.0, metadata=_doc(
        "Idle timeout of an SMTP session.", parse=parse_duration))
    history_retention: float = field(default=7 * 86400.0, metadata=_doc(
        "How long a finished message's envelope, recipient results and trace stay in the spool for `poolmta trace` "
        "and `queue show`, counted from when it was received (its body goes as soon as it is finished); "
        "then they are purged, a few hundred at a time, every minute. 0 = kept for ever (the spool grows "
        "without bound).", parse=parse_duration))
    workers: int = field(default=0, metadata=_doc(
        "Worker processes that take and deliver mail (Postfix runs many smtpd and smtp processes too): they share "
        "the listen port (SO_REUSEPORT) and the spool, and each delivers the mail it accepted. 0 = one per CPU, "
        "at most 16. One event loop uses one core at most: on a busy multi-core host set 0."))


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = field(default=(), metadata=_doc(
        "Resolvers to ask, \"ip\" or \"ip:port\" (e.g. \"127.0.0.1:5353\"); empty = the system resolver (/etc/resolv.conf)."))
    timeout: float = field(default=5.0, metadata=_doc(
        "Seconds to wait for one DNS answer (all tries).", parse=parse_duration))
    cache_ttl_max: float = field(default=3600.0, metadata=_doc(
        "Upper bound on how long an answer is cached.", parse=parse_duration))


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = field(default=25, metadata=_doc(
        "Destination port on the recipients' MX hosts (tests use another)."))
    retry_schedule: tuple[float, ...] = field(default=(300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0), metadata=_doc(
        "Delays before each retry of a deferred recipient; the last one repeats.", parse=parse_duration))
    queue_lifetime: float = field(default=5 * 86400.0, metadata=_doc(
        "How long a message may stay deferred before it expires and bounces (5.4.7).", parse=parse_duration))
    connect_timeout: float = field(default=30.0, metadata=_doc(
        "Seconds to establish a TCP connection to one MX address.", parse=parse_duration))
    command_timeout: float = field(default=300.0, metadata=_doc(
        "Seconds to wait for any reply from the remote server.", parse=parse_duration))
    concurrency: int = field(default=100, metadata=_doc(
        "Most delivery transactions in flight at once."))
    starttls: str = field(default="opportunistic", metadata=_doc(
        "\"opportunistic\": use STARTTLS when offered, without verifying the certificate; \"never\"."))
    max_mx_hosts: int = field(default=5, metadata=_doc(
        "Most MX host addresses tried per delivery attempt."))
    poll_interval: float = field(default=1.0, metadata=_doc(
        "How often the scheduler looks for due recipients when nothing wakes it.", parse=parse_duration))
    connection_cache_time: float = field(default=2.0, metadata=_doc(
        "How long a session to an MX address stays open after a clean transaction, waiting for the next message "
        "from the same pool source (Postfix's smtp_connection_cache_time_limit); 0 = QUIT after every message.",
        parse=parse_duration))
    connection_reuse_limit: int = field(default=100, metadata=_doc(
        "Most transactions on one kept session before it is closed (Postfix's smtp_connection_reuse_count_limit); "
        "a session is also never reused more than 300 s after it was opened."))


@dataclass(frozen=True)
class AuthConfig:
    authserv_id: str = field(default="", metadata=_doc(
        "authserv-id of the Authentication-Results headers we stamp (RFC 8601); empty = server.hostname."))
    spf_timeout: float = field(default=20.0, metadata=_doc(
        "Most seconds one SPF evaluation may take (RFC 7208 §4.6.4 suggests 20).", parse=parse_duration))


@dataclass(frozen=True)
class SrsConfig:
    domain: str = field(default="", metadata=_doc(
        "Domain of rewritten envelope senders (SRS0=…@domain); must be an accepted domain whose MX is this"
        " gateway, so bounces come back; empty = SRS off (authenticated forwarding keeps the original sender).",
        parse=_domain))
    secrets: tuple[str, ...] = field(default=(), metadata=_doc(
        "HMAC secrets: the first signs, all verify (add the new one first to rotate)."))
    format: str = field(default="srs", metadata=_doc(
        "\"srs\": libsrs2/postsrsd SRS0/SRS1; \"m365\": Exchange Online's local+SRS=HHHH=TT=domain=local@forwarding-domain."))
    max_age: float = field(default=21 * 86400.0, metadata=_doc(
        "How long a rewritten address stays valid for bounces (days).", parse=parse_duration))
    hash_length: int = field(default=4, metadata=_doc("Characters of the HMAC kept in the address."))
    keep_foreign_srs1: bool = field(default=False, metadata=_doc(
        "Re-sign a foreign SRS1 sender keeping its first hop, as libsrs2/postsrsd do. Off by default: that"
        " hop is unauthenticated and SRS1 never expires, so bounces could be relayed to it for ever; off, a"
        " foreign SRS1 is wrapped as our own timestamped SRS0."))
    hash_alphabet: str = field(default="base64url", metadata=_doc(
        "Alphabet of the hash we mint: \"base64url\" (postsrsd 2.x) or \"base64\" (libsrs2, postsrsd 1.x);"
        " both are accepted on the way back."))


@dataclass(frozen=True)
class DkimConfig:
    key_dir: str = field(default="", metadata=_doc(
        "Directory of signing keys, DOMAIN/SELECTOR.key plus DOMAIN/active (the selector in use);"
        " empty = DATA_DIR/dkim. `poolmta dkim keygen` and `dkim rotate` manage it."))
    sign: bool = field(default=True, metadata=_doc(
        "Sign outbound mail whose From: domain is an accepted domain with a key."))
    headers: tuple[str, ...] = field(default=(
        "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to", "references",
        "mime-version", "content-type", "content-transfer-encoding", "list-unsubscribe"), metadata=_doc(
        "Header fields to sign (From is always signed)."))
    algorithm: str = field(default="rsa-sha256", metadata=_doc(
        "Default algorithm of `dkim keygen`: \"rsa-sha256\" (2048-bit) or \"ed25519-sha256\"."))
    arc: bool = field(default=True, metadata=_doc(
        "Add an ARC set (RFC 8617) to forwarded mail we let through, with the key of the forwarding domain."))


@dataclass(frozen=True)
class StateConfig:
    backend: str = field(default="sqlite", metadata=_doc(
        "Where sending-limit counters and restricted senders live: \"sqlite\" (one node, DATA_DIR/state.db)"
        " or \"redis\" (shared by every node of a cluster)."))
    url: str = field(default="redis://127.0.0.1:6379/0", metadata=_doc("Redis URL, with backend = \"redis\"."))
    key_prefix: str = field(default="poolmta:", metadata=_doc("Prefix of every Redis key (several services, one Redis)."))


@dataclass(frozen=True)
class LimitsConfig:
    recipients_per_day: int = field(default=10_000, metadata=_doc(
        "Service limit: recipients per sender in a rolling 24 h; over it the excess leaves through high-risk."))
    messages_per_minute: int = field(default=30, metadata=_doc(
        "Service limit: messages per sender per minute; over it the excess leaves through high-risk."))
    spam_restrict_count: int = field(default=5, metadata=_doc(
        "A sender whose outbound mail is judged spam this many times within spam_restrict_window is restricted"
        " (0 = never)."))
    spam_restrict_window: float = field(default=3600.0, metadata=_doc(
        "Window of spam_restrict_count.", parse=parse_duration))


@dataclass(frozen=True)
class SpamConfig:
    spamd: str = field(default="127.0.0.1:783", metadata=_doc("spamd address for engine \"spamassassin\"."))
    rspamd_url: str = field(default="http://127.0.0.1:11333", metadata=_doc("rspamd controller/normal worker URL for engine \"rspamd\"."))
    timeout: float = field(default=10.0, metadata=_doc(
        "Most seconds a spam check may take; slower counts as a failed check.", parse=parse_duration))
    max_size: int = field(default=512 * 1024, metadata=_doc(
        "Messages larger than this are checked on their first max_size bytes (like spamc -s).", parse=parse_size))


@dataclass(frozen=True)
class PolicyConfig:
    name: str = field(default="default", metadata=_doc("Name shown in the trace and in alerts."))
    priority: int = field(default=0, metadata=_doc("Custom policies: the lowest number that matches wins."))
    senders: tuple[str, ...] = field(default=(), metadata=_doc(
        "Custom policies: From: addresses it applies to (case-insensitive)."))
    domains: tuple[str, ...] = field(default=(), metadata=_doc(
        "Custom policies: From: domains it applies to.", parse=_domain))
    recipient_limit_external_per_hour: int = field(default=0, metadata=_doc(
        "External recipients per sender per hour (0 = no policy limit; 0..10000)."))
    recipient_limit_internal_per_hour: int = field(default=0, metadata=_doc(
        "Recipients in the tenant's accepted domains per sender per hour (0 = no policy limit; 0..10000)."))
    recipient_limit_per_day: int = field(default=0, metadata=_doc(
        "Recipients per sender per UTC day (0 = no policy limit; 0..10000)."))
    action_when_limit_reached: str = field(default="block_user_for_today", metadata=_doc(
        "\"block_user_for_today\" (restricted until the next UTC day), \"block_user\" (until released),"
        " \"alert\" (notify only)."))


@dataclass(frozen=True)
class SourceConfig:
    address: str = field(default="", metadata=_doc("Local IP address to bind for outbound connections.", parse=_ip))
    ehlo: str = field(default="", metadata=_doc("EHLO name: the name the address's PTR record carries.", parse=_hostname))


@dataclass(frozen=True)
class PoolConfig:
    role: str = field(default="normal", metadata=_doc(
        "What the pool is for: \"normal\", \"high-risk\" or \"relay\"."))
    sources: tuple[SourceConfig, ...] = field(default=(), metadata=_doc(
        "Source addresses of the pool: [{ address = \"…\", ehlo = \"…\" }]; connections are spread over them."))


@dataclass(frozen=True)
class UserConfig:
    name: str = field(default="", metadata=_doc("Login name for SMTP AUTH (usually an address)."))
    password_hash: str = field(default="", metadata=_doc(
        "Hash made by `poolmta hash-password` ($scrypt$…); plain passwords are refused."))


@dataclass(frozen=True)
class ConnectorConfig:
    name: str = field(default="", metadata=_doc("Name shown in the trace."))
    client_ips: tuple[str, ...] = field(default=(), metadata=_doc(
        "Addresses or CIDRs allowed to relay for the tenant.", parse=_network))
    trusted: bool = field(default=False, metadata=_doc(
        "Believe spam verdict headers (X-Spam-Flag) this connector adds."))
    skip_ips: tuple[str, ...] = field(default=(), metadata=_doc(
        "Skip listing (Enhanced Filtering for Connectors): hops in the Received chain from these addresses/CIDRs"
        " are ours or the tenant's, not the original sender; SPF is checked against the first hop not skipped.",
        parse=_network))
    skip_last_hop: bool = field(default=False, metadata=_doc(
        "Skip listing: the connector itself is a relay in front of us (e.g. a third-party filter): evaluate SPF"
        " against the hop before it."))


@dataclass(frozen=True)
class TenantConfig:
    accepted_domains: tuple[str, ...] = field(default=(), metadata=_doc(
        "Domains the tenant owns; mail from them is the tenant's own.", parse=_domain))
    users: tuple[UserConfig, ...] = field(default=(), metadata=_doc(
        "SMTP AUTH users: [{ name = \"…\", password_hash = \"…\" }]."))
    connectors: tuple[ConnectorConfig, ...] = field(default=(), metadata=_doc(
        "Servers that relay for the tenant by client IP: [{ name, client_ips, trusted }]."))
    forward: dict[str, tuple[str, ...]] = field(default_factory=dict, metadata=_doc(
        "Forwarding: address in an accepted domain → external addresses it forwards to.", parse=_address))
    admins: tuple[str, ...] = field(default=(), metadata=_doc(
        "Addresses that get alerts (a sender restricted, a limit reached), sent through the gateway itself.",
        parse=_address))
    spam_engine: str = field(default="builtin", metadata=_doc(
        "Outbound spam verdicts: \"builtin\" (GTUBE, trusted upstream headers), \"spamassassin\" (spamd),"
        " \"rspamd\"."))
    on_engine_failure: str = field(default="normal", metadata=_doc(
        "When the spam engine is down or slow: \"normal\" (route as if clean), \"high-risk\", or \"defer\""
        " (451 at DATA: the client retries)."))
    external_recipients_per_day: int = field(default=0, metadata=_doc(
        "Tenant-wide external recipients per rolling 24 h, over which external sending is refused (550 5.7.233);"
        " 0 = from licenses (500 × licenses^0.7 + 9500), or no limit when licenses is 0."))
    licenses: int = field(default=0, metadata=_doc("Licence count for the tenant external recipient limit formula."))
    policy: PolicyConfig = field(default_factory=PolicyConfig, metadata=_doc(
        "The tenant's default outbound spam policy (always applies when no custom policy matches)."))
    policies: tuple[PolicyConfig, ...] = field(default=(), metadata=_doc(
        "Custom outbound spam policies: [{ name, priority, senders, domains, limits…, action_when_limit_reached }]."))
    auto_forwarding: str = field(default="on", metadata=_doc(
        "\"on\": forwarding addresses forward to external targets; \"off\": they do not, and an external sender"
        " gets a DSN 550 5.7.520 (Exchange Online's automatic forwarding control)."))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig, metadata=_doc("SMTP listener."))
    dns: DnsConfig = field(default_factory=DnsConfig, metadata=_doc("DNS resolver."))
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig, metadata=_doc("Outbound delivery."))
    auth: AuthConfig = field(default_factory=AuthConfig, metadata=_doc("Inbound authentication (SPF, DKIM)."))
    srs: SrsConfig = field(default_factory=SrsConfig, metadata=_doc("Sender Rewriting Scheme for forwarded mail."))
    dkim: DkimConfig = field(default_factory=DkimConfig, metadata=_doc("DKIM signing and ARC sealing."))
    state: StateConfig = field(default_factory=StateConfig, metadata=_doc("Shared sender state (limits, restrictions)."))
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata=_doc("Service sending limits."))
    spam: SpamConfig = field(default_factory=SpamConfig, metadata=_doc("Spam engines."))
    pools: dict[str, PoolConfig] = field(default_factory=dict, metadata=_doc("Delivery pools by name."))
    tenants: dict[str, TenantConfig] = field(default_factory=dict, metadata=_doc("Tenants by name."))
    source_file: str = field(default="", metadata=_doc("Internal: the file this was loaded from.", internal=True))

    # -- derived views, for the stages ------------------------------------
    def pool_objects(self) -> dict[str, Pool]:
        return {name: Pool(name, Role(p.role), tuple(Source(s.address, s.ehlo) for s in p.sources))
                for name, p in self.pools.items()}

    def pool_for_role(self) -> dict[Role, str]:
        """The first pool (in file order) that plays each role."""
        out: dict[Role, str] = {}
        for name, p in self.pools.items():
            out.setdefault(Role(p.role), name)
        return out


# ---- embedded defaults -----------------------------------------------------

DEFAULT_TOML = """\
# The embedded defaults: one machine, three pools on loopback addresses so the
# routing can be watched without touching the network, and a connector that
# lets local clients (127.0.0.1, ::1) relay, like Postfix's default mynetworks.
[pools.normal]
role = "normal"
sources = [{ address = "127.0.0.2", ehlo = "out1.poolmta.localhost" }]

[pools.high-risk]
role = "high-risk"
sources = [{ address = "127.0.0.3", ehlo = "hr1.poolmta.localhost" }]

[pools.relay]
role = "relay"
sources = [{ address = "127.0.0.4", ehlo = "rly1.poolmta.localhost" }]

[tenants.local]
accepted_domains = ["localhost"]
connectors = [{ name = "loopback", client_ips = ["127.0.0.1/32", "::1/128"] }]
"""


# ---- loading ----------------------------------------------------------------

class _Lines:
    """Find the line of a dotted key in TOML text (tomllib keeps no positions)."""

    def __init__(self, text: str):
        self.index: dict[str, int] = {}
        table = ""
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if m:
                table = ".".join(p.strip().strip('"\'') for p in m.group(1).split("."))
                self.index.setdefault(table, n)
                continue
            m = re.match(r"^(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.-]+)\s*=", line)
            if m:
                key = ".".join(p.strip().strip('"\'') for p in m.group(1).split("."))
                self.index.setdefault(f"{table}.{key}" if table else key, n)

    def find(self, key: str) -> int:
        k = re.sub(r"\[\d+\]", "", key)
        while k:
            if k in self.index:
                return self.index[k]
            k = k.rpartition(".")[0]
        return 0


def _convert(tp: Any, value: Any, key: str, meta: dict, problems: list[Problem]) -> Any:
    origin = typing.get_origin(tp)
    parse = meta.get("parse")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(Problem(key, "must be a table"))
            return tp()
        return _build(tp, value, key, problems)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, list):
            problems.append(Problem(key, "must be a list"))
            return ()
        return tuple(_convert(inner, v, f"{key}[{i}]", meta, problems) for i, v in enumerate(value))
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(Problem(key, "must be a table"))
            return {}
        out = {}
        for k, v in value.items():
            sub = f"{key}.{k}"
            if parse and not dataclasses.is_dataclass(inner):
                try:
                    k = parse(k)
                except ValueError as e:
                    problems.append(Problem(sub, str(e)))
                    continue
            out[k] = _convert(inner, v, sub, meta, problems)
        return out
    if parse:
        try:
            return parse(value)
        except (ValueError, TypeError) as e:
            problems.append(Problem(key, str(e)))
            return None
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(Problem(key, f"must be true or false, not {value!r}"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(Problem(key, f"must be an integer, not {value!r}"))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(Problem(key, f"must be a number, not {value!r}"))
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(Problem(key, f"must be a string, not {value!r}"))
        return value
    return value


def _build(cls: type, data: dict, prefix: str, problems: list[Problem]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        f = known.get(k.replace("-", "_")) if k not in known else known[k]
        if f is None:
            problems.append(Problem(key, f"unknown setting (known: {', '.join(sorted(known))})"))
            continue
        kwargs[f.name] = _convert(hints[f.name], v, key, dict(f.metadata), problems)
    return cls(**kwargs)


def loads(text: str, file: str = "") -> Config:
    """Parse TOML text into a Config; raise ConfigError naming every bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([Problem("(file)", f"not valid TOML: {e}", file=file)]) from None
    problems: list[Problem] = []
    cfg = _build(Config, data, "", problems)
    cfg = dataclasses.replace(cfg, source_file=file)
    lines = _Lines(text)
    errors = [dataclasses.replace(p, file=file, line=lines.find(p.key)) for p in problems]
    if errors:
        raise ConfigError(errors)
    problems = [dataclasses.replace(p, file=file, line=lines.find(p.key)) for p in check(cfg)]
    if any(p.severity == "error" for p in problems):
        raise ConfigError([p for p in problems if p.severity == "error"])
    return cfg


def load(path: str | os.PathLike | None) -> Config:
    """The config in ``path``, or the embedded defaults when path is None."""
    if path is None:
        return loads(DEFAULT_TOML, "(embedded defaults)")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Problem("(file)", f"cannot read: {e.strerror}", file=str(p))]) from None
    return loads(text, str(p))


def check_text(text: str, file: str = "") -> list[Problem]:
    """Every problem in a config text, errors and warnings, for `config check`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [Problem("(file)", f"not valid TOML: {e}", file=file)]
    problems: list[Problem] = []
    cfg = _build(Config, data, "", problems)
    if not problems:
        problems = check(cfg)
    lines = _Lines(text)
    return [dataclasses.replace(p, file=file, line=lines.find(p.key)) for p in problems]


def check(cfg: Config) -> list[Problem]:
    """Cross-field checks: contradictions, missing roles, unsafe choices."""
    out: list[Problem] = []
    s, d = cfg.server, cfg.delivery
    try:
        if not re.search(r":\d+$", s.listen):
            out.append(Problem("server.listen", f"give the port too, \"host:port\" (e.g. \"{s.listen}:25\"): {s.listen!r}"))
        else:
            parse_hostport(s.listen, 25)
    except ValueError as e:
        out.append(Problem("server.listen", str(e)))
    if not 0 <= s.workers <= 16:
        out.append(Problem("server.workers", "must be 0 (one per CPU) to 16"))
    if s.max_hops < 1:
        out.append(Problem("server.max_hops", "must be at least 1"))
    if s.max_recipients < 1:
        out.append(Problem("server.max_recipients", "must be at least 1"))
    if s.max_message_size < 1024:
        out.append(Problem("server.max_message_size", "must be at least 1024 bytes"))
    if bool(s.tls_cert) != bool(s.tls_key):
        out.append(Problem("server.tls_cert", "server.tls_cert and server.tls_key must be set together"))
    for f in ("tls_cert", "tls_key"):
        path = getattr(s, f)
        if path and not os.path.isfile(path):
            out.append(Problem(f"server.{f}", f"file not found: {path}"))
    for i, ns in enumerate(cfg.dns.nameservers):
        try:
            parse_hostport(ns, 53)
        except ValueError as e:
            out.append(Problem(f"dns.nameservers[{i}]", str(e)))
    if not 0 < d.port < 65536:
        out.append(Problem("delivery.port", "must be 1..65535"))
    if d.connection_cache_time < 0:
        out.append(Problem("delivery.connection_cache_time", "must not be negative"))
    if d.connection_reuse_limit < 1:
        out.append(Problem("delivery.connection_reuse_limit", "must be at least 1"))
    if not d.retry_schedule:
        out.append(Problem("delivery.retry_schedule", "must list at least one delay"))
    elif min(d.retry_schedule) <= 0:
        out.append(Problem("delivery.retry_schedule", "delays must be positive"))
    elif d.retry_schedule[0] >= d.queue_lifetime:
        out.append(Problem("delivery.queue_lifetime",
                           "delivery.queue_lifetime is shorter than the first delivery.retry_schedule delay: nothing would ever be retried"))
    if d.concurrency < 1:
        out.append(Problem("delivery.concurrency", "must be at least 1"))
    if d.starttls not in ("opportunistic", "never"):
        out.append(Problem("delivery.starttls", f"must be \"opportunistic\" or \"never\", not {d.starttls!r}"))

    if cfg.state.backend not in ("sqlite", "redis"):
        out.append(Problem("state.backend", f"must be \"sqlite\" or \"redis\", not {cfg.state.backend!r}"))
    elif cfg.state.backend == "redis" and not cfg.state.url.startswith(("redis://", "rediss://", "unix://")):
        out.append(Problem("state.url", f"not a Redis URL: {cfg.state.url!r}"))
    sr = cfg.srs
    if sr.format not in ("srs", "m365"):
        out.append(Problem("srs.format", f"must be \"srs\" or \"m365\", not {sr.format!r}"))
    if sr.domain and not sr.secrets:
        out.append(Problem("srs.secrets", "srs.domain is set but srs.secrets is empty: SRS needs a secret to sign with"))
    if any(len(x) < 16 for x in sr.secrets):
        out.append(Problem("srs.secrets", "a secret shorter than 16 characters can be guessed", severity="warning"))
    if sr.domain and not any(sr.domain in t.accepted_domains for t in cfg.tenants.values()):
        out.append(Problem("srs.domain", f"{sr.domain} is not an accepted domain: bounces to SRS addresses would be"
                                         " refused as relaying", severity="warning"))
    if sr.hash_alphabet not in ("base64url", "base64"):
        out.append(Problem("srs.hash_alphabet", f"must be \"base64url\" or \"base64\", not {sr.hash_alphabet!r}"))
    if not 1 <= sr.hash_length <= 27:
        out.append(Problem("srs.hash_length", "must be 1..27"))
    if cfg.dkim.algorithm not in ("rsa-sha256", "ed25519-sha256"):
        out.append(Problem("dkim.algorithm", f"must be \"rsa-sha256\" or \"ed25519-sha256\", not {cfg.dkim.algorithm!r}"))
    roles = [r.value for r in Role]
    seen_addr: dict[str, str] = {}
    for name, p in cfg.pools.items():
        if p.role not in roles:
            out.append(Problem(f"pools.{name}.role", f"must be one of {', '.join(roles)}, not {p.role!r}"))
            continue
        if not p.sources:
            out.append(Problem(f"pools.{name}.sources", "a pool needs at least one source"))
        for i, src in enumerate(p.sources):
            if not src.address:
                out.append(Problem(f"pools.{name}.sources[{i}].address", "missing"))
            if not src.ehlo:
                out.append(Problem(f"pools.{name}.sources[{i}].ehlo", "missing"))
            if p.role == Role.RELAY and src.ehlo and "rly" not in src.ehlo:
                out.append(Problem(f"pools.{name}.sources[{i}].ehlo",
                                   f"relay-pool host names should contain \"rly\" so receivers can tell relayed mail: {src.ehlo!r}",
                                   severity="warning"))
            other = seen_addr.get(src.address)
            if src.address and other and other != name:
                out.append(Problem(f"pools.{name}.sources[{i}].address",
                                   f"{src.address} is also a source of pool {other!r}: the pools would share a reputation",
                                   severity="warning" if Role.HIGH_RISK not in (p.role, cfg.pools[other].role) else "error"))
            seen_addr.setdefault(src.address, name)
    have = {p.role for p in cfg.pools.values()}
    for r in roles:
        if r not in have:
            out.append(Problem("pools", f"no pool has role {r!r}: every message must have a pool to leave through"))

    domains: dict[str, str] = {}
    users: dict[str, str] = {}
    forwards = {a.lower() for t in cfg.tenants.values() for a in t.forward}
    for t in cfg.tenants.values():
        for dom in t.accepted_domains:
            domains.setdefault(dom, "")
    for tname, t in cfg.tenants.items():
        for dom in t.accepted_domains:
            if domains.get(dom) and domains[dom] != tname:
                out.append(Problem(f"tenants.{tname}.accepted_domains",
                                   f"{dom} is also an accepted domain of tenant {domains[dom]!r}"))
            if not domains.get(dom):
                domains[dom] = tname
        if t.spam_engine not in ("builtin", "spamassassin", "rspamd"):
            out.append(Problem(f"tenants.{tname}.spam_engine",
                               f"must be \"builtin\", \"spamassassin\" or \"rspamd\", not {t.spam_engine!r}"))
        if t.on_engine_failure not in ("normal", "high-risk", "defer"):
            out.append(Problem(f"tenants.{tname}.on_engine_failure",
                               f"must be \"normal\", \"high-risk\" or \"defer\", not {t.on_engine_failure!r}"))
        for j, pol in enumerate((t.policy,) + t.policies):
            key = f"tenants.{tname}.policy" if j == 0 else f"tenants.{tname}.policies[{j - 1}]"
            for f_ in ("recipient_limit_external_per_hour", "recipient_limit_internal_per_hour",
                       "recipient_limit_per_day"):
                v = getattr(pol, f_)
                if not isinstance(v, int) or not 0 <= v <= 10000:
                    out.append(Problem(f"{key}.{f_}", f"must be 0..10000, not {v!r}"))
            if pol.action_when_limit_reached not in ("block_user_for_today", "block_user", "alert"):
                out.append(Problem(f"{key}.action_when_limit_reached",
                                   "must be \"block_user_for_today\", \"block_user\" or \"alert\""))
            if j > 0 and not (pol.senders or pol.domains):
                out.append(Problem(key, "a custom policy needs senders or domains to match"))
        if t.auto_forwarding not in ("on", "off"):
            out.append(Problem(f"tenants.{tname}.auto_forwarding", f"must be \"on\" or \"off\", not {t.auto_forwarding!r}"))
        for i, u in enumerate(t.users):
            key = f"tenants.{tname}.users[{i}]"
            if not u.name:
                out.append(Problem(f"{key}.name", "missing"))
            if not u.password_hash.startswith("$scrypt$"):
                out.append(Problem(f"{key}.password_hash",
                                   "not a poolmta password hash: make one with `poolmta hash-password`"))
            if u.name.lower() in users:
                out.append(Problem(f"{key}.name", f"user {u.name!r} is also defined in tenant {users[u.name.lower()]!r}"))
            users.setdefault(u.name.lower(), tname)
        for i, c in enumerate(t.connectors):
            if not c.client_ips:
                out.append(Problem(f"tenants.{tname}.connectors[{i}].client_ips", "a connector needs at least one address"))
            for net in c.client_ips:
                n = ipaddress.ip_network(net)
                # More than a /8 of IPv4 or a /32 of IPv6 (an ISP's whole allocation) is
                # an open relay in all but name; an IPv4-mapped IPv6 range counts as IPv4.
                mapped = n.version == 6 and n.subnet_of(ipaddress.ip_network("::ffff:0:0/96"))
                too_wide = n.prefixlen < (8 + 96 if mapped else 8 if n.version == 4 else 32)
                if too_wide:
                    out.append(Problem(f"tenants.{tname}.connectors[{i}].client_ips",
                                       f"{net} lets a very large network relay: an open relay in all but name"))
        for addr, targets in t.forward.items():
            if addr.rpartition("@")[2] not in t.accepted_domains:
                out.append(Problem(f"tenants.{tname}.forward.{addr}",
                                   "a forwarding address must be in one of the tenant's accepted_domains"))
            for j, target in enumerate(targets):
                try:
                    _address(target)
                except ValueError as e:
                    out.append(Problem(f"tenants.{tname}.forward.{addr}[{j}]", str(e)))
                    continue
                if target.lower() in forwards:
                    out.append(Problem(f"tenants.{tname}.forward.{addr}[{j}]",
                                       f"{target} is itself a forwarding address: forwarding is one level deep"
                                       " and a chain back to itself would loop"))
                elif target.rpartition("@")[2].lower() in domains:
                    out.append(Problem(f"tenants.{tname}.forward.{addr}[{j}]",
                                       f"{target} is in an accepted domain: it leaves through that domain's MX, "
                                       "which must not forward it back here", severity="warning"))
    return out


def check_host(cfg: Config) -> list[Problem]:
    """Checks against this host: can every pool source address be bound here?

    A source address that is not on the host makes every delivery of its pool
    fail locally; `serve` refuses to start with one, `config check` warns
    (the file may be checked on another machine than the one that runs it).
    """
    import socket
    out: list[Problem] = []
    for name, p in cfg.pools.items():
        for i, src in enumerate(p.sources):
            if not src.address:
                continue
            family = socket.AF_INET6 if ":" in src.address else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.bind((src.address, 0))
            except OSError as e:
                out.append(Problem(f"pools.{name}.sources[{i}].address",
                                   f"{src.address} cannot be bound on this host ({e.strerror}): "
                                   "is it an address of this machine?"))
    return out


def documented_fields() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every setting: docs and the doc self-check."""
    rows = []

    def walk(cls: type, prefix: str):
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            tp = typing.get_type_hints(cls)[f.name]
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            rows.append((prefix, f.name, default, f.metadata.get("doc", "")))
            origin = typing.get_origin(tp)
            inner = typing.get_args(tp)[0] if origin is tuple else typing.get_args(tp)[-1] if origin is dict else tp
            if dataclasses.is_dataclass(inner):
                walk(inner, f"{prefix}.{f.name}" if prefix else f.name)

    walk(Config, "")
    return rows
