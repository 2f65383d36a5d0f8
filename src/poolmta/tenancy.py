"""tenancy - who is who: tenants, their accepted domains, users, connectors, forwards

Built once from config. Answers the questions ingress and assess ask:
which tenant does this AUTH user / client IP belong to, which tenant accepts
this domain, where does this address forward to. Domain comparisons are
case-insensitive and ignore a trailing dot.

TRUST: addresses passed in are untrusted client input; nothing here splits
them further than the last "@".

SEE ALSO: ingress/acceptance.py, assess/forwarded.py, config.py (tenants)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import base64
from dataclasses import dataclass

from .config import Config, ConnectorConfig, TenantConfig
from .model import domain_of


@dataclass(frozen=True)
class ConnectorMatch:
    tenant: str
    name: str
    trusted: bool
    skip_ips: tuple[str, ...] = ()    # skip listing: Received hops from these networks are not the original sender
    skip_last_hop: bool = False


class Directory:
    def __init__(self, cfg: Config):
        self.domains: dict[str, str] = {}
        self.users: dict[str, tuple[str, str]] = {}      # login (lower) -> (tenant, hash)
        self.forwards: dict[str, tuple[str, tuple[str, ...]]] = {}  # address (lower) -> (tenant, targets)
        self.connectors: list[tuple[ipaddress._BaseNetwork, str, ConnectorConfig]] = []
        for tname, t in cfg.tenants.items():
            for d in t.accepted_domains:
                self.domains.setdefault(d.lower(), tname)
            for u in t.users:
                self.users[u.name.lower()] = (tname, u.password_hash)
            for addr, targets in t.forward.items():
                self.forwards[addr.lower()] = (tname, tuple(targets))
            for c in t.connectors:
                for net in c.client_ips:
                    self.connectors.append((ipaddress.ip_network(net), tname, c))
        # Most specific network first, so a /32 connector wins over a /8 one.
        self.connectors.sort(key=lambda x: -x[0].prefixlen)
        self.forwarding_off: frozenset[str] = frozenset(
            tname for tname, t in cfg.tenants.items() if t.auto_forwarding == "off")
        self.accepted_by_tenant: dict[str, frozenset[str]] = {
            tname: frozenset(d.lower() for d in t.accepted_domains) for tname, t in cfg.tenants.items()}
        self.tenant_configs: dict[str, TenantConfig] = dict(cfg.tenants)
        self._connector_memo: dict[str, ConnectorMatch | None] = {}

    def tenant(self, name: str) -> TenantConfig | None:
        """The tenant's settings (spam_engine, on_engine_failure, policies, …), None for an unknown name."""
        return self.tenant_configs.get(name) if name else None

    def tenant_of_domain(self, domain: str) -> str:
        return self.domains.get(domain.rstrip(".").lower(), "")

    def is_accepted(self, tenant: str, domain: str) -> bool:
        return domain.rstrip(".").lower() in self.accepted_by_tenant.get(tenant, frozenset())

    def submitted_by_tenant(self, auth_user: str, client_ip: str) -> bool:
        """Did the tenant itself hand us this message (SMTP AUTH, or its own connector)?

        A skip-listed connector is a filter relaying *internet* mail to us: what it
        passes on was not submitted by the tenant, whatever its sender claims.
        """
        if auth_user:
            return True
        c = self.connector_for(client_ip) if client_ip else None
        return c is not None and not (c.skip_ips or c.skip_last_hop)

    def auto_forwarding(self, tenant: str) -> bool:
        """May the tenant's forwarding addresses forward to external targets?"""
        return tenant not in self.forwarding_off

    def connector_for(self, ip: str) -> ConnectorMatch | None:
        """The connector a client address belongs to (most specific network first).
        Asked several times per message: answers are remembered per address string
        (the table is configuration; the memory is bounded)."""
        try:
            return self._connector_memo[ip]
        except KeyError:
            pass
        if len(self._connector_memo) >= 4096:
            self._connector_memo.clear()
        found = self._connector_memo[ip] = self._find_connector(ip)
        return found

    def _find_connector(self, ip: str) -> ConnectorMatch | None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        for net, tenant, c in self.connectors:
            if addr.version == net.version and addr in net:
                return ConnectorMatch(tenant, c.name or str(net), c.trusted, tuple(c.skip_ips), c.skip_last_hop)
        return None

    def forward_targets(self, address: str) -> tuple[str, tuple[str, ...]] | None:
        return self.forwards.get(address.lower())

    def authenticate(self, login: str, password: str) -> str | None:
        """The tenant of a user whose password matches, else None."""
        entry = self.users.get(login.lower())
        if entry is None:
            verify_password(password, _DUMMY_HASH)   # same cost either way: no user enumeration by timing
            return None
        tenant, hashed = entry
        return tenant if verify_password(password, hashed) else None

    def tenant_of_user(self, login: str) -> str:
        e = self.users.get(login.lower())
        return e[0] if e else ""

    def tenant_for_route(self, mail_from: str, recipients: list[str]) -> str:
        """Best guess of the vouching tenant when only an envelope is known (`poolmta route`)."""
        t = self.tenant_of_domain(domain_of(mail_from))
        if t:
            return t
        for r in recipients:
            t = self.tenant_of_domain(domain_of(r))
            if t:
                return t
        return ""


# ---- password hashing --------------------------------------------------------
# hashlib.scrypt is in the standard library and memory-hard; a format of our own
# ("$scrypt$ln=14,r=8,p=1$salt$hash", base64 without padding) avoids a dependency.

_N_LOG2, _R, _P = 14, 8, 1


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2 ** _N_LOG2, r=_R, p=_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")
    return f"$scrypt$ln={_N_LOG2},r={_R},p={_P}${b64(salt)}${b64(dk)}"


def verify_password(password: str, hashed: str) -> bool:
    try:
        _, scheme, params, salt_b64, dk_b64 = hashed.split("$")
        if scheme != "scrypt":
            return False
        p = dict(kv.split("=") for kv in params.split(","))
        unb64 = lambda s: base64.b64decode(s + "=" * (-len(s) % 4))
        salt, want = unb64(salt_b64), unb64(dk_b64)
        got = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2 ** int(p["ln"]), r=int(p["r"]),
                             p=int(p["p"]), dklen=len(want), maxmem=2 ** 26)
        return hmac.compare_digest(got, want)
    except (ValueError, KeyError):
        return False


_DUMMY_HASH = hash_password("poolmta-no-such-user", salt=b"\0" * 16)
