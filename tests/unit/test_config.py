"""Config: defaults load, every setting documented, bad keys named with their line."""

from pathlib import Path

import pytest

from poolmta import config
from poolmta.model import Role
from tests.support.configs import POOLS

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_defaults_load_and_have_every_role():
    cfg = config.load(None)
    roles = cfg.pool_for_role()
    assert set(roles) == set(Role)
    assert cfg.delivery.port == 25
    assert cfg.server.max_recipients == 500


def test_every_setting_is_documented():
    # like Postfix's mantools/check-postconf-undocumented
    missing = [f"{s}.{k}" for s, k, _, doc in config.documented_fields() if not doc]
    assert missing == []


def test_example_config_is_valid():
    problems = config.check_text((ROOT / "examples" / "poolmta.toml").read_text(), "poolmta.toml")
    assert [p for p in problems if p.severity == "error"] == []
    cfg = config.load(ROOT / "examples" / "poolmta.toml")
    addrs = {p.role: {s.address for s in p.sources} for p in cfg.pool_objects().values()}
    assert not (addrs[Role.NORMAL] & addrs[Role.HIGH_RISK])
    assert not (addrs[Role.NORMAL] & addrs[Role.RELAY])


BASE = POOLS


@pytest.mark.parametrize("extra,key,needle", [
    ('[server]\nbogus = 1\n', "server.bogus", "unknown setting"),
    ('[pools.x]\nrole = "relay"\nsources = [{ address = "1.2.3", ehlo = "rly.x" }]\n',
     "pools.x.sources[0].address", "not an IP address"),
    ('[delivery]\nretry_schedule = ["soon"]\n', "delivery.retry_schedule[0]", "not a duration"),
    ('[delivery]\nport = "25"\n', "delivery.port", "must be an integer"),
    ('[server]\nmax_message_size = "lots"\n', "server.max_message_size", "not a size"),
    ('[dns]\nnameservers = ["dns.example"]\n', "dns.nameservers[0]", ""),
    ('[tenants.a]\naccepted_domains = ["a.example"]\nconnectors = [{ name = "c", client_ips = ["300.1.1.1"] }]\n',
     "tenants.a.connectors[0].client_ips[0]", "not an address or CIDR"),
    ('[tenants.a]\naccepted_domains = ["a.example"]\nusers = [{ name = "u@a.example", password_hash = "secret" }]\n',
     "tenants.a.users[0].password_hash", "hash-password"),
    ('[tenants.a]\naccepted_domains = ["a.example"]\n[tenants.a.forward]\n"x@b.example" = ["y@c.example"]\n',
     "tenants.a.forward.x@b.example", "accepted_domains"),
    ('[delivery]\nqueue_lifetime = "1m"\nretry_schedule = ["5m"]\n', "delivery.queue_lifetime", "shorter"),
    ('[server]\nlisten = "127.0.0.1"\n', "server.listen", "give the port"),
    ('[tenants.a]\naccepted_domains = ["a.example"]\nconnectors = [{ name = "c", client_ips = ["::/0"] }]\n',
     "tenants.a.connectors[0].client_ips", "open relay"),
    ('[tenants.a]\naccepted_domains = ["a.example"]\nconnectors = [{ name = "c", client_ips = ["2000::/3"] }]\n',
     "tenants.a.connectors[0].client_ips", "open relay"),
    ('[tenants.a]\naccepted_domains = ["a.example"]\nconnectors = [{ name = "c", client_ips = ["::ffff:0:0/96"] }]\n',
     "tenants.a.connectors[0].client_ips", "open relay"),
    ('[tenants.a]\naccepted_domains = ["a.example"]\n[tenants.a.forward]\n"x@a.example" = ["x@a.example"]\n',
     "tenants.a.forward.x@a.example[0]", "forwarding is one level deep"),
])
def test_bad_settings_are_named(extra, key, needle):
    problems = [p for p in config.check_text(BASE + extra, "t.toml") if p.severity == "error"]
    assert any(p.key == key and needle in p.message for p in problems), problems
    with pytest.raises(config.ConfigError) as e:
        config.loads(BASE + extra, "t.toml")
    assert key in str(e.value)


def test_error_names_line():
    text = BASE + "[server]\nlisten = \"127.0.0.1:2525\"\nbogus = 1\n"
    (p,) = [p for p in config.check_text(text, "t.toml") if p.key == "server.bogus"]
    assert p.line == text.splitlines().index("bogus = 1") + 1
    assert str(p).startswith(f"t.toml:{p.line}: error: server.bogus")


def test_relay_pool_without_rly_warns():
    text = BASE.replace("rly1.example.net", "out9.example.net")
    problems = config.check_text(text, "t.toml")
    assert [p.severity for p in problems if p.key == "pools.r.sources[0].ehlo"] == ["warning"]
    config.loads(text)   # a warning does not stop loading


def test_missing_role_is_an_error():
    text = BASE.split("[pools.r]")[0]
    assert any("relay" in p.message for p in config.check_text(text) if p.severity == "error")


def test_shared_source_between_normal_and_high_risk_is_an_error():
    text = BASE.replace('address = "127.0.0.3"', 'address = "127.0.0.2"')
    assert any(p.key == "pools.h.sources[0].address" and p.severity == "error" for p in config.check_text(text))


def test_durations_and_sizes():
    assert config.parse_duration("15m") == 900
    assert config.parse_duration(30) == 30
    assert config.parse_size("25M") == 25 * 1024 * 1024
    assert config.parse_hostport("127.0.0.1:5353", 53) == ("127.0.0.1", 5353)
    assert config.parse_hostport("::1", 53) == ("::1", 53)
    assert config.parse_hostport("[::1]:25", 53) == ("::1", 25)


def test_example_password_is_secret():
    from poolmta.tenancy import Directory
    d = Directory(config.load(ROOT / "examples" / "poolmta.toml"))
    assert d.authenticate("alice@contoso.test", "secret") == "contoso"
    assert d.authenticate("ALICE@contoso.test", "secret") == "contoso"
    assert d.authenticate("alice@contoso.test", "wrong") is None
    assert d.authenticate("nobody@contoso.test", "secret") is None


def test_narrow_connectors_are_fine():
    text = BASE + '[tenants.a]\naccepted_domains = ["a.example"]\n' \
        'connectors = [{ name = "c", client_ips = ["10.0.0.0/8", "2001:db8::/32", "::ffff:10.0.0.0/104"] }]\n'
    assert [p for p in config.check_text(text) if p.severity == "error"] == []


def test_forward_into_an_accepted_domain_warns():
    text = BASE + '[tenants.a]\naccepted_domains = ["a.example", "b.example"]\n' \
        '[tenants.a.forward]\n"x@a.example" = ["y@b.example"]\n'
    assert [p.severity for p in config.check_text(text) if p.key == "tenants.a.forward.x@a.example[0]"] == ["warning"]


def test_source_address_not_on_this_host():
    cfg = config.loads(BASE)
    assert config.check_host(cfg) == []            # 127.0.0.x is always ours
    bad = config.loads(BASE.replace("127.0.0.4", "192.0.2.77"))
    (p,) = config.check_host(bad)
    assert p.key == "pools.r.sources[0].address" and "cannot be bound on this host" in p.message
