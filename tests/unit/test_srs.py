"""rewrite.srs: every PostSRSd vector, the validity window to the day, secret
rotation, hash case and alphabet, forgeries, SRS1 hops and the m365 form."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from poolmta.clock import FakeClock
from poolmta.config import SrsConfig
from poolmta.rewrite.srs import (SRS, SRSBadHash, SRSError, SRSExpired, SRSMalformed, SRSNotOurs,
                                 SRSNotReversible)

DAY = 86400
VECTORS = json.loads((Path(__file__).resolve().parent.parent / "data" / "srs" / "postsrsd-vectors.json").read_text())
P = VECTORS["parameters"]
N_FORWARD, N_REVERSE = 9, 17                      # items in the file: a change to it must be noticed

# expected_error descriptions in the file -> the SRSError subclass we raise for them
ERROR_KINDS = [
    ("no @ sign", SRSMalformed),
    ("too big", SRSMalformed),
    ("not an srs address", SRSNotOurs),
    ("timestamp out of date", SRSExpired),
    ("hash invalid", SRSBadHash),
    ("no hash", SRSMalformed),
    ("no timestamp", SRSMalformed),
    ("no host", SRSMalformed),
    ("no user", SRSMalformed),
]


def vector_srs(alphabet: str = "base64url", now: float | None = None) -> SRS:
    return SRS(P["local_domain"], [P["secret"]], clock=FakeClock(P["now_unix"] if now is None else now),
               hash_length=P["hash_length"], max_age=P["max_age_days"] * DAY, hash_alphabet=alphabet,
               keep_foreign_srs1=True)          # the vectors are libsrs2/postsrsd behaviour


def error_kind(description: str) -> type[SRSError]:
    for needle, kind in ERROR_KINDS:
        if needle in description.lower():
            return kind
    raise AssertionError(f"no error class mapped for {description!r}")


def run_vector(kind: str, item: dict, alphabet: str) -> str | None:
    """None when the item passes, else what went wrong."""
    srs = vector_srs(alphabet)
    fn = srs.forward if kind == "forward" else srs.reverse
    try:
        got, err = fn(item["input"]), None
    except SRSError as e:
        got, err = None, e
    if "expected" in item:
        want = item["expected"]
        if alphabet == "base64":
            want = item.get("expected_libsrs2_std_base64", want)
        return None if got == want else f"got {got!r} ({err!r}), want {want!r}"
    want_kind = error_kind(item["expected_error"])
    return None if isinstance(err, want_kind) else f"got {got!r} ({err!r}), want {want_kind.__name__}"


ALL = [(k, i, item) for k in ("forward", "reverse") for i, item in enumerate(VECTORS[k])]


@pytest.mark.parametrize("alphabet", ["base64url", "base64"])
@pytest.mark.parametrize("kind,index,item", ALL, ids=[f"{k}{i}" for k, i, _ in ALL])
def test_postsrsd_vector(kind, index, item, alphabet):
    problem = run_vector(kind, item, alphabet)
    assert problem is None, f"{kind}[{index}] {item['input'][:80]!r}: {problem}"


def test_postsrsd_vectors_all_pass_and_count(capsys):
    assert (len(VECTORS["forward"]), len(VECTORS["reverse"])) == (N_FORWARD, N_REVERSE)
    results = {}
    for alphabet in ("base64url", "base64"):
        failed = [(k, i) for k, i, item in ALL if run_vector(k, item, alphabet) is not None]
        results[alphabet] = (len(ALL) - len(failed), len(ALL), failed)
    with capsys.disabled():
        for alphabet, (ok, n, _) in results.items():
            print(f"\nSRS vectors ({alphabet} minting): {ok}/{n} passed"
                  f" ({N_FORWARD} forward, {N_REVERSE} reverse)")
    assert all(not failed for _, _, failed in results.values()), results


def test_algorithm_matches_the_vectors_parameter_block():
    # Recompute the SRS0 of the file's first rewrite from the parameters' own words.
    day = P["now_unix"] // DAY % 1024
    abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    stamp = abc[day >> 5] + abc[day & 31]
    assert stamp == "2W"
    mac = hmac.new(P["secret"].encode(), (stamp + "otherdomain.com" + "test").lower().encode(), hashlib.sha1)
    h = base64.b64encode(mac.digest()).decode()[:4]
    assert f"SRS0={h}={stamp}=otherdomain.com=test@example.com" == "SRS0=vmyz=2W=otherdomain.com=test@example.com"


# ---- the window, to the day ---------------------------------------------------------------

def clocked(start: float, **kw) -> tuple[SRS, FakeClock]:
    clock = FakeClock(start)
    return SRS("fwd.example", ["s3cret-for-the-window"], clock=clock, **kw), clock


D0 = 20000 * DAY                                     # a UTC midnight


def test_day_21_valid_day_22_expired():
    srs, clock = clocked(D0 + 12 * 3600)
    a = srs.forward("alice@sender.example")
    clock.advance(21 * DAY)
    assert srs.reverse(a) == "alice@sender.example"
    clock.advance(DAY)
    with pytest.raises(SRSExpired):
        srs.reverse(a)


def test_window_boundary_is_the_utc_day_not_24h_multiples():
    # Minted at the last second of day D: valid through the last second of D+21 ...
    srs, clock = clocked(D0 + DAY - 1)
    a = srs.forward("alice@sender.example")
    clock.advance(21 * DAY)
    assert srs.reverse(a) == "alice@sender.example"
    clock.advance(1)                                # ... and refused from the first second of D+22
    with pytest.raises(SRSExpired, match="22 days old"):
        srs.reverse(a)
    # Minted at the first second of day D: also valid until the end of D+21 (21 days + 86399 s).
    srs, clock = clocked(D0)
    a = srs.forward("alice@sender.example")
    clock.advance(22 * DAY - 1)
    assert srs.reverse(a) == "alice@sender.example"
    clock.advance(1)
    with pytest.raises(SRSExpired):
        srs.reverse(a)


def test_max_age_is_read_in_whole_days():
    srs, clock = clocked(D0, max_age=3 * DAY)
    a = srs.forward("alice@sender.example")
    clock.advance(3 * DAY)
    assert srs.reverse(a)
    clock.advance(DAY)
    with pytest.raises(SRSExpired):
        srs.reverse(a)


def test_clock_skew_into_the_future():
    # Minted by a node whose clock is a day ahead: still honoured here (skew_days=1) ...
    ahead, _ = clocked(D0 + DAY + 60)
    here, _ = clocked(D0 + 30)
    assert here.reverse(ahead.forward("alice@sender.example")) == "alice@sender.example"
    # ... two days ahead is not, nor with skew_days=0 (libsrs2's and PostSRSd's behaviour).
    far, _ = clocked(D0 + 2 * DAY)
    with pytest.raises(SRSExpired, match="2 days in the future"):
        here.reverse(far.forward("alice@sender.example"))
    strict, _ = clocked(D0 + 30, skew_days=0)
    with pytest.raises(SRSExpired, match="1 days in the future"):
        strict.reverse(ahead.forward("alice@sender.example"))


def test_stamp_wraps_every_1024_days():
    srs, clock = clocked(D0)
    a = srs.forward("alice@sender.example")
    clock.advance(1024 * DAY)                        # a property of every 2-character SRS stamp
    assert srs.reverse(a) == "alice@sender.example"
    clock.advance(22 * DAY)
    with pytest.raises(SRSExpired):
        srs.reverse(a)


def test_malformed_stamps():
    srs = vector_srs()
    for bad in ("SRS0=vmyz=2W1=otherdomain.com=test@example.com",      # CVE-2020-35573: long stamp
                "SRS0=vmyz=2=otherdomain.com=test@example.com",
                "SRS0=vmyz=2!=otherdomain.com=test@example.com"):
        with pytest.raises(SRSMalformed):
            srs.reverse(bad)


# ---- secrets, hash case and alphabet, forgeries ---------------------------------------------

def test_secret_rotation_first_signs_all_verify():
    clock = FakeClock(D0)
    old = SRS("fwd.example", ["old-secret-0123456"], clock=clock)
    new = SRS("fwd.example", ["new-secret-6543210", "old-secret-0123456"], clock=clock)
    new_only = SRS("fwd.example", ["new-secret-6543210"], clock=clock)
    minted_old = old.forward("alice@sender.example")
    minted_new = new.forward("alice@sender.example")
    assert minted_new == new_only.forward("alice@sender.example")      # the first secret signs
    assert minted_new != minted_old
    assert new.reverse(minted_old) == new.reverse(minted_new) == "alice@sender.example"
    with pytest.raises(SRSBadHash):
        old.reverse(minted_new)
    with pytest.raises(SRSBadHash):
        new_only.reverse(minted_old)


def hash_of(address: str) -> str:
    return address.split("=")[1]


def test_hash_compared_case_insensitively():
    srs = vector_srs()
    a = srs.forward("test@otherdomain.com")
    h = hash_of(a)
    assert srs.reverse(a.replace(h, h.swapcase(), 1)) == "test@otherdomain.com"
    assert srs.reverse(a.lower()) == "test@otherdomain.com"
    assert srs.reverse(a.upper()) == "TEST@OTHERDOMAIN.COM"


def find_hash(srs: SRS, chars: str) -> tuple[str, str]:
    for i in range(2000):
        sender = f"user{i}@sender.example"
        a = srs.forward(sender)
        if any(c in hash_of(a) for c in chars):
            return sender, a
    raise AssertionError("no hash with those characters in 2000 tries")


def test_reverse_takes_base64_and_base64url_hashes():
    url, std = vector_srs("base64url"), vector_srs("base64")
    sender, a_url = find_hash(url, "-_")
    a_std = std.forward(sender)
    h = hash_of(a_url)
    assert a_std == a_url.replace(f"={h}=", "=" + h.translate(str.maketrans("-_", "+/")) + "=", 1)
    for srs in (url, std):                              # either minting setting reverses both
        assert srs.reverse(a_url) == srs.reverse(a_std) == sender


def test_minting_alphabets():
    url, std = vector_srs("base64url"), vector_srs("base64")
    _, a = find_hash(std, "+/")
    assert "+" in hash_of(a) or "/" in hash_of(a)
    for i in range(300):
        assert not set(hash_of(url.forward(f"user{i}@sender.example"))) & set("+/")


@pytest.mark.parametrize("tamper", ["hash", "stamp", "domain", "local", "short"])
def test_forged_addresses_refused(tamper):
    srs, clock = clocked(D0 + 5 * DAY)
    a = srs.forward("alice@sender.example")
    tag, h, stamp, domain, rest = a.split("=", 4)
    local = rest.rpartition("@")[0]
    forged = {
        "hash": f"{tag}={'A' if h[0] != 'A' else 'B'}{h[1:]}={stamp}={domain}={rest}",
        "stamp": f"{tag}={h}={srs._stamp()[0]}{'A' if stamp[1] != 'A' else 'B'}={domain}={rest}",
        "domain": f"{tag}={h}={stamp}=evil.example={rest}",
        "local": f"{tag}={h}={stamp}={domain}=mallory@fwd.example",
        "short": f"{tag}={h[:3]}={stamp}={domain}={rest}",
    }[tamper]
    assert local == "alice"
    with pytest.raises(SRSMalformed if tamper == "short" else SRSBadHash):
        srs.reverse(forged)


def test_forged_and_expired_reports_forged():
    srs, clock = clocked(D0)
    a = srs.forward("alice@sender.example")
    clock.advance(100 * DAY)
    with pytest.raises(SRSExpired):
        srs.reverse(a)
    with pytest.raises(SRSBadHash):
        srs.reverse(a.replace("=alice@", "=bob@"))


def test_longer_hash_compared_on_hash_length():
    srs = vector_srs()
    assert srs.reverse("SRS0=vmyzXYZ=2W=otherdomain.com=test@example.com") == "test@otherdomain.com"


# ---- SRS1: second and third hops -----------------------------------------------------------

def test_srs1_round_trip_over_three_hops():
    clock = FakeClock(D0 + 3600)
    a = SRS("a.example", ["secret-of-hop-a-12345"], clock=clock)
    b = SRS("b.example", ["secret-of-hop-b-12345"], clock=clock)
    c = SRS("c.example", ["secret-of-hop-c-12345"], clock=clock, keep_foreign_srs1=True)
    s0 = a.forward("Alice@Sender.example")
    assert s0.startswith("SRS0=") and s0.endswith("=sender.example=Alice@a.example".replace("sender", "Sender"))
    s1 = b.forward(s0)
    opaque = s0.rpartition("@")[0][4:]                      # "=HHHH=TT=Sender.example=Alice"
    assert s1 == f"SRS1={s1.split('=')[1]}=a.example={opaque}@b.example"
    s1c = c.forward(s1)                                      # same first hop and opaque, re-signed by c
    assert s1c == f"SRS1={s1c.split('=')[1]}=a.example={opaque}@c.example"
    # Bounces: each SRS1 goes straight back to the first hop, which recovers the sender.
    assert b.reverse(s1) == c.reverse(s1c) == s0
    assert a.reverse(b.reverse(s1)) == "Alice@Sender.example"
    with pytest.raises(SRSBadHash):
        b.reverse(s1c.replace("@c.example", "@b.example"))   # c's hash does not verify at b
    with pytest.raises(SRSBadHash):
        c.reverse(s1c.replace("=a.example=", "=evil.example="))


def test_srs1_keeps_a_foreign_first_separator():
    srs = vector_srs()
    s1 = srs.forward("SRS0-opaque@hop1.example")
    assert s1.startswith("SRS1=") and s1.endswith("=hop1.example=-opaque@example.com")
    assert srs.reverse(s1) == "SRS0-opaque@hop1.example"


def test_malformed_foreign_srs1_is_wrapped_as_srs0():
    srs = vector_srs()
    a = srs.forward("SRS1=garbage@hop.example")
    assert a.startswith("SRS0=") and srs.reverse(a) == "SRS1=garbage@hop.example"


def test_srs1_reverse_malformed():
    srs = vector_srs()
    for bad, msg in (("SRS1=@example.com", "no hash"), ("SRS1=JIBX@example.com", "no host"),
                     ("SRS1=JIBX=thirddomain.com@example.com", "no user"),
                     ("SRS1=JIBX==x@example.com", "no host")):
        with pytest.raises(SRSMalformed, match=msg):
            srs.reverse(bad)


# ---- what is never rewritten, and is_srs -----------------------------------------------------

def test_null_sender_and_own_domains_are_not_rewritten():
    srs = SRS("fwd.example", ["s3cret-0123456789"], clock=FakeClock(D0), exclude_domains=["other.example", ".sub.example"])
    assert srs.forward("") == ""
    assert srs.forward("bob@FWD.example.") == "bob@FWD.example."
    assert srs.forward("SRS0=xxxx=AA=a.example=b@fwd.example") == "SRS0=xxxx=AA=a.example=b@fwd.example"
    assert srs.forward("bob@other.example") == "bob@other.example"
    assert srs.forward("bob@x.sub.example") == "bob@x.sub.example"
    assert srs.forward("bob@sub.example").startswith("SRS0=")


def test_forward_refuses_what_is_not_an_address():
    srs = vector_srs()
    for bad in ("foo", "@otherdomain.com", "test@", "a" * 500 + "@" + "b" * 12 + ".net"):
        with pytest.raises(SRSMalformed):
            srs.forward(bad)


def test_reverse_null_and_plain_addresses():
    srs = vector_srs()
    for a in ("", "bob@example.com", "srs0@example.com", "SRS2=x=y=z=w@example.com"):
        with pytest.raises(SRSNotOurs):
            srs.reverse(a)


def test_is_srs():
    srs = vector_srs()
    for a in ("SRS0=vmyz=2W=otherdomain.com=test@example.com", "srs1=x=y==z@example.com", "SRS0-x@y",
              "SRS0+opaque@example.com", "bob+SRS=abcd=2W=a.example=c@example.com",
              "bounces+srs=abcd=2W@example.com", "SRS0=@example.com"):
        assert srs.is_srs(a), a
    for a in ("", "bob@example.com", "srs0@example.com", "srs0x=y@example.com", "bob+srs@example.com",
              "bob@srs0=example.com"):
        assert not srs.is_srs(a), a


def test_non_ascii_local_parts_fold_ascii_only():
    srs = vector_srs()
    a = srs.forward("Jörg@Sender.example")
    assert srs.reverse(a) == "Jörg@Sender.example"
    ascii_upper = "".join(c.upper() if c.isascii() else c for c in a)
    assert srs.reverse(ascii_upper) == "JöRG@SENDER.EXAMPLE"
    with pytest.raises(SRSBadHash):                         # C tolower() leaves ö and Ö apart, and so do we
        srs.reverse(a.replace("Jörg", "JÖrg"))


# ---- the Microsoft 365 form -----------------------------------------------------------------

def m365(now: float = D0 + 3600) -> SRS:
    return SRS("bounce.example", ["m365-secret-0123456"], clock=FakeClock(now), format="m365")


def test_m365_form_round_trip():
    srs = m365()
    a = srs.forward("alice@sender.example", forwarder="bob@fwd.example")
    tag, h, stamp, domain, rest = a.split("=", 4)
    assert tag == "bob+SRS" and rest == "alice@fwd.example" and domain == "sender.example"
    assert len(h) == 4 and len(stamp) == 2
    assert srs.is_srs(a)
    assert srs.reverse(a) == "alice@sender.example"
    assert srs.reverse(a.lower()) == "alice@sender.example"
    # The same hash and stamp as the SRS0 form for the same sender and day.
    srs0 = SRS("bounce.example", ["m365-secret-0123456"], clock=FakeClock(D0 + 3600))
    assert srs0.forward("alice@sender.example").split("=")[1:3] == [h, stamp]


def test_m365_local_part_with_separators_and_plus():
    srs = m365()
    a = srs.forward("a=b+c@sender.example", forwarder="bob.smith+list@fwd.example")
    assert a.startswith("bob.smith+list+SRS=") and srs.reverse(a) == "a=b+c@sender.example"


def test_m365_forged_and_expired():
    srs = m365()
    a = srs.forward("alice@sender.example", forwarder="bob@fwd.example")
    with pytest.raises(SRSBadHash):
        srs.reverse(a.replace("=alice@", "=mallory@"))
    later = m365(D0 + 3600 + 22 * DAY)
    with pytest.raises(SRSExpired):
        later.reverse(a)
    assert m365(D0 + 3600 + 21 * DAY).reverse(a) == "alice@sender.example"


def test_m365_fallback_over_64_octets_is_valid_but_not_reversible():
    srs = m365()
    a = srs.forward("a.rather.long.local.part@a-long-sending-domain.example", forwarder="bob@fwd.example")
    local, _, domain = a.rpartition("@")
    assert local.startswith("bounces+SRS=") and local.count("=") == 2 and domain == "bounce.example"
    assert srs.is_srs(a)
    with pytest.raises(SRSNotReversible):
        srs.reverse(a)
    with pytest.raises(SRSBadHash):                          # forged fallback: forged, not "not reversible"
        h = a.split("=")[1]
        srs.reverse(a.replace(f"={h}=", f"={'A' if h[0] != 'A' else 'B'}{h[1:]}=", 1))
    with pytest.raises(SRSExpired):
        m365(D0 + 3600 + 30 * DAY).reverse(a)


def test_m365_exactly_64_octets_is_kept():
    srs = m365()
    fixed = len("bob+SRS=HHHH=TT=s.example=")
    local = "x" * (64 - fixed)
    a = srs.forward(f"{local}@s.example", forwarder="bob@fwd.example")
    assert len(a.rpartition("@")[0]) == 64 and srs.reverse(a) == f"{local}@s.example"
    b = srs.forward(f"{local}y@s.example", forwarder="bob@fwd.example")
    assert b.startswith("bounces+SRS=")
    # Octets, not characters: a 2-octet character tips it over too.
    c = srs.forward(f"{local[:-1]}é@s.example", forwarder="bob@fwd.example")
    assert c.startswith("bounces+SRS=")


def test_m365_needs_the_forwarder_and_skips_local_senders():
    srs = m365()
    with pytest.raises(ValueError):
        srs.forward("alice@sender.example")
    assert srs.forward("carol@fwd.example", forwarder="bob@fwd.example") == "carol@fwd.example"
    assert srs.forward("carol@bounce.example", forwarder="bob@fwd.example") == "carol@bounce.example"
    assert srs.forward("", forwarder="bob@fwd.example") == ""


def test_either_format_reverses_both_forms():
    srs_form = SRS("bounce.example", ["m365-secret-0123456"], clock=FakeClock(D0 + 3600))
    m = m365()
    a = m.forward("alice@sender.example", forwarder="bob@fwd.example")
    b = srs_form.forward("alice@sender.example")
    assert srs_form.reverse(a) == m.reverse(b) == "alice@sender.example"


# ---- construction ---------------------------------------------------------------------------

def test_from_config():
    cfg = SrsConfig(domain="fwd.example", secrets=("new-secret-6543210", "old-secret-0123456"), max_age=10 * DAY,
                    hash_length=6)
    clock = FakeClock(D0)
    srs = SRS.from_config(cfg, clock)
    a = srs.forward("alice@sender.example")
    assert len(hash_of(a)) == 6 and a.endswith("@fwd.example")
    clock.advance(11 * DAY)
    with pytest.raises(SRSExpired):
        srs.reverse(a)


@pytest.mark.parametrize("kw", [dict(domain=""), dict(secrets=()), dict(format="x"), dict(hash_length=0),
                                dict(hash_length=28), dict(max_age=2000 * DAY), dict(hash_alphabet="hex")])
def test_bad_settings(kw):
    args = dict(domain="fwd.example", secrets=("s3cret-0123456789",))
    args.update(kw)
    domain, secrets = args.pop("domain"), args.pop("secrets")
    with pytest.raises(ValueError):
        SRS(domain, secrets, clock=FakeClock(D0), **args)


def test_errors_carry_their_reason():
    srs = vector_srs()
    with pytest.raises(SRSError) as e:
        srs.reverse("SRS0=FAKE=2V=otherdomain.com=test@example.com")
    assert e.value.reason == str(e.value) == "hash invalid in SRS address"


def test_foreign_srs1_is_wrapped_by_default_so_it_expires():
    """An attacker's SRS1 naming a victim as first hop must not become a bounce
    relay to that victim: by default it is wrapped as our own SRS0 (timestamped),
    whose bounce goes back to the SRS1 address itself and expires."""
    clock = FakeClock(D0 + 3600)
    srs = SRS("fwd.example", ["s3cret-for-the-window"], clock=clock)
    sender = "SRS1=abcd=victim.example==anything@attacker.example"
    wrapped = srs.forward(sender)
    assert wrapped.startswith("SRS0=") and "victim.example==" not in wrapped.split("@")[0][:40]
    assert srs.reverse(wrapped) == sender
    clock.advance(23 * DAY)
    with pytest.raises(SRSExpired):
        srs.reverse(wrapped)
