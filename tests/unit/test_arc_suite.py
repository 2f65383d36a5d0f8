"""ARC sealing (rewrite/arc.py) against the ValiMail ARC test suite (tests/data/arc/, MIT,
from ../shared/corpus/dkim/arc_test_suite), and dkimpy's ARC verifier on what we emit.

Signing suite (arc-draft-sign-tests.yml, 2 scenarios, 17 cases): all 17 match. 16 produce
an ARC set whose ARC-Seal and ARC-Message-Signature are identical to the expected ones
tag by tag, b= included (RSA PKCS#1 v1.5 is deterministic, so equal b= means we hashed
exactly the same canonical text), and whose ARC-Authentication-Results is the expected one
after relaxed canonicalisation; `no_additional_sig` (a chain already marked cv=fail)
produces no set. How the cases are fed to our API:

- ``seal`` takes the Authentication-Results value as an argument instead of reading the
  message; the harness extracts it the way an RFC 8617 sealer does: every
  Authentication-Results field of the case's srv-id, comments around the authserv-id
  dropped, results merged in order (`ar_merged1`, `ar_merged2`), other ADMDs ignored.
- The chain status is the arc= result of those fields, passed as ``cv``: the suite's input
  chains are not meant to validate (dkimpy, and any verifier, fails the i=1 seal of the
  `i1_base`/`i2_base` inputs), the arc= value says what the sealer concluded.
- The suite writes tags sorted and unfolded ("a=; b=; bh=; c=; d=; h=a:b; i=; s=; t="),
  which is dkimpy's ``standardize`` layout, so these cases run with ``compact=True``.
  Our default layout folds lines and writes ``h=a : b``; the relaxed canonical form
  then differs, so b= differs by construction. The default layout is checked for the
  same tag values and AAR and for verifying.

Validation suite (arc-draft-validation-tests.yml, 10 scenarios, 170 cases) through
dkimpy 1.1.8's verifier with minkey=512, a regression of our environment: 166 agree.
The 4 known misses: two rsa-sha1 cases (``ams_fields_a_sha1``, ``as_fields_a_sha1``:
the draft allowed sha1, RFC 8301/8617 do not, dkimpy fails them), ``ams_fields_c_na``
(an unknown c= value that dkimpy ignores for ARC, which is relaxed only) and
``as_fields_b_512`` (a 512-bit key the suite wants failed: it passes under minkey=512,
the setting the other cases need). Expected cv "" (empty) is a chain ended by an earlier
cv=fail, which dkimpy reports as None.
"""

from __future__ import annotations

from pathlib import Path

import dkim as dkimpy
import pytest
import yaml

from poolmta.rewrite import arc, keys
from poolmta.rewrite.keys import Key

DATA = Path(__file__).resolve().parents[1] / "data" / "arc"
SIGN = list(yaml.safe_load_all((DATA / "arc-draft-sign-tests.yml").read_text()))
VALIDATE = list(yaml.safe_load_all((DATA / "arc-draft-validation-tests.yml").read_text()))

KNOWN_VALIDATION_MISSES = {"ams_fields_a_sha1", "as_fields_a_sha1", "ams_fields_c_na", "as_fields_b_512"}


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def canon(v: str | bytes) -> str:
    if isinstance(v, bytes):
        v = v.decode()
    return " ".join(v.split())


def tags(v: str | bytes) -> dict[str, str]:
    """Tag=value pairs, whitespace removed from values (FWS is allowed in b= and bh=)."""
    out = {}
    for part in canon(v).split(";"):
        if "=" in part:
            k, val = part.split("=", 1)
            out[k.strip()] = "".join(val.split())
    return out


def zone_dnsfunc(records: dict[str, str]):
    zone = {k.lower().rstrip(".") + ".": "".join(v.split("\n")).encode() for k, v in records.items()}

    def dnsfunc(name, timeout=5):
        return zone.get(name.decode().lower())
    return dnsfunc


def authres_for(content: bytes, srv_id: str) -> tuple[str, str | None]:
    """(merged Authentication-Results value of SRV_ID, its arc= result) as a sealer reads them."""
    results: list[str] = []
    for v in arc.header_values(content, "authentication-results"):
        parts = arc._split_top(v)
        head = arc._strip_comments(parts[0]).split()
        if head and head[0].lower() == srv_id.lower():
            results += [p for p in parts[1:] if p]
    cv = None
    for r in results:
        m = arc._METHOD.match(arc._strip_comments(r))
        if m and m.group(1).lower() == "arc":
            cv = m.group(2).lower()
    return "; ".join([srv_id, *results]), cv


def sign_cases():
    for scenario in SIGN:
        for name, case in scenario["tests"].items():
            yield pytest.param(scenario, case, id=name)


def suite_key(scenario) -> Key:
    return Key(scenario["domain"], scenario["sel"], "rsa-sha256", scenario["privatekey"].encode(), 1024, "suite")


def seal_case(scenario, case, compact: bool):
    content = crlf(case["message"])
    ar, cv = authres_for(content, case["srv-id"])
    return content, arc.seal(content, scenario["domain"], suite_key(scenario), ar, case["srv-id"], case["t"],
                             cv=cv, dnsfunc=zone_dnsfunc(scenario["txt-records"]),
                             headers=case["sig-headers"].split(":"), compact=compact, minkey=512)


def new_set(out: bytes, content: bytes) -> dict[str, str]:
    added = out[:len(out) - len(content)]
    assert out.endswith(content)
    return {"AS": arc.header_values(added, "arc-seal")[0],
            "AMS": arc.header_values(added, "arc-message-signature")[0],
            "AAR": arc.header_values(added, "arc-authentication-results")[0]}


def test_the_suites_are_the_ones_described():
    assert len(SIGN) == 2 and sum(len(s["tests"]) for s in SIGN) == 17
    assert len(VALIDATE) == 10 and sum(len(s["tests"]) for s in VALIDATE) == 170


@pytest.mark.parametrize("scenario,case", list(sign_cases()))
def test_sign_suite_exact(scenario, case):
    content, out = seal_case(scenario, case, compact=True)
    if not case["AS"].strip():                         # no_additional_sig: the chain is over
        assert isinstance(out, arc.SealProblem) and out.code == "chain-terminated", out
        return
    assert isinstance(out, bytes), out
    got = new_set(out, content)
    assert canon(got["AAR"]) == canon(case["AAR"])
    assert tags(got["AMS"]) == tags(case["AMS"])        # b= included
    assert tags(got["AS"]) == tags(case["AS"])
    # the set is prepended in the usual order: AS, AMS, AAR
    assert out.startswith(b"ARC-Seal: ")


@pytest.mark.parametrize("scenario,case", list(sign_cases()))
def test_sign_suite_default_layout(scenario, case):
    content, out = seal_case(scenario, case, compact=False)
    if not case["AS"].strip():
        assert isinstance(out, arc.SealProblem) and out.code == "chain-terminated"
        return
    got = new_set(out, content)
    assert canon(got["AAR"]) == canon(case["AAR"])
    for k in ("AMS", "AS"):
        g, e = tags(got[k]), tags(case[k])
        g.pop("b"), e.pop("b")
        if "h" in g:
            assert g.pop("h").split(":") == e.pop("h").split(":")
        assert g == e, k
    assert all(len(line) <= 78 for line in out[:len(out) - len(content)].split(b"\r\n"))
    if case["AS"] and tags(case["AS"])["cv"] == "none":
        cv, _, reason = dkimpy.arc_verify(out, dnsfunc=zone_dnsfunc(scenario["txt-records"]), minkey=512)
        assert cv == dkimpy.CV_Pass, reason


def test_validation_suite_through_dkimpy():
    agree, misses = 0, set()
    for scenario in VALIDATE:
        dnsfunc = zone_dnsfunc(scenario["txt-records"])
        for name, case in scenario["tests"].items():
            cv, _, _ = dkimpy.arc_verify(crlf(case["message"]), dnsfunc=dnsfunc, minkey=512)
            got = cv.decode() if cv is not None else ""
            if got == str(case["cv"]).lower():
                agree += 1
            else:
                misses.add(name)
    assert (agree, misses) == (166, KNOWN_VALIDATION_MISSES)


# ---- what we emit, verified by dkimpy ------------------------------------------------------------

MSG = (b"Received: from mail.sender.example ([192.0.2.7])\r\n\tby mx.fwd.example; Tue, 1 Dec 2026 12:00:00 +0000\r\n"
       b"From: Alice <alice@sender.example>\r\nTo: bob@fwd.example\r\nSubject: forwarded\r\n"
       b"Date: Tue, 1 Dec 2026 11:59:00 +0000\r\nMessage-ID: <f1@sender.example>\r\n\r\nHello Bob.\r\n")
AUTHRES = "mx.fwd.example; spf=pass smtp.mailfrom=alice@sender.example; dkim=none (no signature)"


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    kd = tmp_path_factory.mktemp("dkim")
    g1 = keys.keygen(str(kd), "fwd.example")
    g2 = keys.keygen(str(kd), "relay.example")
    keys.keygen(str(kd), "ed.example", algorithm="ed25519-sha256")
    zone = {g.name + ".": g.value.encode() for g in (g1, g2)}
    return kd, (lambda name, timeout=5: zone.get(name.decode().lower()))


def test_first_seal_verifies_and_records_what_we_saw(ours):
    kd, dnsfunc = ours
    out = arc.seal(MSG, "fwd.example", keys.active_key(str(kd), "fwd.example"), AUTHRES, "mx.fwd.example",
                   1796212800, dnsfunc=dnsfunc)
    assert isinstance(out, bytes), out
    s = new_set(out, MSG)
    assert canon(s["AAR"]) == ("i=1; mx.fwd.example; arc=none; spf=pass smtp.mailfrom=alice@sender.example; "
                               "dkim=none (no signature)")
    assert (tags(s["AS"])["i"], tags(s["AS"])["cv"], tags(s["AS"])["t"]) == ("1", "none", "1796212800")
    assert tags(s["AMS"])["h"].split(":") == ["from", "to", "subject", "date", "message-id"]
    assert tags(s["AMS"])["c"] == "relaxed/relaxed"
    cv, results, reason = dkimpy.arc_verify(out, dnsfunc=dnsfunc)
    assert cv == dkimpy.CV_Pass, reason
    assert arc.chain_status(out, dnsfunc) == ("pass", "success")


def test_second_hop_validates_the_chain_itself_and_seals_cv_pass(ours):
    kd, dnsfunc = ours
    one = arc.seal(MSG, "fwd.example", keys.active_key(str(kd), "fwd.example"), AUTHRES, "mx.fwd.example",
                   1796212800, dnsfunc=dnsfunc)
    hop = b"Received: from mx.fwd.example\r\n\tby mx.relay.example; Tue, 1 Dec 2026 12:01:00 +0000\r\n" + one
    two = arc.seal(hop, "relay.example", keys.active_key(str(kd), "relay.example"),
                   "mx.relay.example; spf=fail smtp.mailfrom=alice@sender.example", "mx.relay.example",
                   1796212860, dnsfunc=dnsfunc)
    assert isinstance(two, bytes), two
    s = new_set(two, hop)
    assert (tags(s["AS"])["i"], tags(s["AS"])["cv"], tags(s["AS"])["d"]) == ("2", "pass", "relay.example")
    assert canon(s["AAR"]).startswith("i=2; mx.relay.example; arc=pass; spf=fail")
    cv, results, reason = dkimpy.arc_verify(two, dnsfunc=dnsfunc)
    assert cv == dkimpy.CV_Pass, reason
    assert [r["instance"] for r in results] == [2, 1] and all(r["as-valid"] and r["ams-valid"] for r in results)


def test_a_broken_chain_is_sealed_cv_fail_once_and_then_is_over(ours):
    kd, dnsfunc = ours
    one = arc.seal(MSG, "fwd.example", keys.active_key(str(kd), "fwd.example"), AUTHRES, "mx.fwd.example",
                   1796212800, dnsfunc=dnsfunc)
    tampered = one.replace(b"Hello Bob.", b"Hello Eve.")
    assert arc.chain_status(tampered, dnsfunc)[0] == "fail"
    two = arc.seal(tampered, "relay.example", keys.active_key(str(kd), "relay.example"),
                   "mx.relay.example; spf=pass smtp.mailfrom=alice@sender.example", "mx.relay.example",
                   1796212860, dnsfunc=dnsfunc)
    assert isinstance(two, bytes), two
    s = new_set(two, tampered)
    assert tags(s["AS"])["cv"] == "fail" and "arc=fail" in canon(s["AAR"])
    # dkimpy: the newest set says fail, so the chain is over. (Its seal covers our set
    # only, RFC 8617 §5.1.2, as the suite's i1_base_fail case expects; dkimpy's verifier
    # hashes every set for it and does not need it to decide.)
    cv, results, _ = dkimpy.arc_verify(two, dnsfunc=dnsfunc)
    assert cv is None and results[0]["instance"] == 2 and results[0]["cv"] == b"fail" and results[0]["ams-valid"]
    # ... so check that seal over our set alone: without the i=1 set it verifies
    only_ours = two[:len(two) - len(tampered)] + MSG.replace(b"Hello Bob.", b"Hello Eve.")
    a = dkimpy.ARC(only_ours)
    assert a.verify_instance(a.sorted_arc_headers()[1], 2, dnsfunc=dnsfunc)["as-valid"]
    three = arc.seal(two, "fwd.example", keys.active_key(str(kd), "fwd.example"), AUTHRES, "mx.fwd.example",
                     1796212900, dnsfunc=dnsfunc)
    assert isinstance(three, arc.SealProblem) and three.code == "chain-terminated" and "i=2" in three.reason


def test_seal_problems_never_raise(ours):
    kd, dnsfunc = ours
    key = keys.active_key(str(kd), "fwd.example")

    def seal(content=MSG, domain="fwd.example", k=key, authres=AUTHRES, srv="mx.fwd.example", **kw):
        return arc.seal(content, domain, k, authres, srv, 1796212800, dnsfunc=dnsfunc, **kw)

    p = seal(domain="ed.example", k=keys.active_key(str(kd), "ed.example"))
    assert isinstance(p, arc.SealProblem) and p.code == "key-type" and "rsa-sha256" in p.reason
    p = seal(domain="nokey.example", k=keys.active_key(str(kd), "nokey.example"))
    assert isinstance(p, arc.SealProblem) and p.code == "no-key" and "nokey.example" in str(p)
    assert seal(domain="relay.example").code == "no-key"                 # another domain's key
    assert seal(authres="mx.other.example; spf=pass").code == "authres"
    assert seal(authres="mx.fwd.example; spf=pass\r\nBcc: x@evil.example").code == "authres"
    assert seal(authres="mx.fwd.example; arc=pass; spf=pass").code == "cv"     # no chain, yet arc=pass
    assert seal(cv="pass").code == "cv"                                         # i=1 must be cv=none
    assert seal(cv="maybe").code == "cv"
    assert seal(content=b"Subject: no author\r\n\r\nx\r\n").code == "error"
    fifty = b"".join(b"ARC-Seal: i=%d; cv=pass; a=rsa-sha256; d=x.example; s=s; b=AAAA\r\n" % i
                     for i in range(50, 0, -1))
    p = seal(content=fifty + MSG, cv="pass")
    assert p.code == "instance-limit"
    for junk in (b"", b"\xff\x00" * 64, b"From: a@b.example"):
        assert isinstance(seal(content=junk), (bytes, arc.SealProblem))


def test_aar_from_authres():
    assert arc.aar_value("", "mx.example", "none") == ("mx.example", ["arc=none"])
    assert arc.aar_value("mx.example; none", "mx.example", "none") == ("mx.example", ["arc=none"])
    assert arc.aar_value("MX.example 1;\r\n spf=pass (sender IP is 192.0.2.7; ok) smtp.mailfrom=a@b.example;"
                         "\r\n\tdkim=pass header.d=b.example", "mx.example", "pass") == (
        "mx.example", ["arc=pass", "spf=pass (sender IP is 192.0.2.7; ok) smtp.mailfrom=a@b.example",
                       "dkim=pass header.d=b.example"])
    assert arc.aar_value("mx.example; spf=pass; arc=fail (i=1 broken)", "mx.example", "fail") == (
        "mx.example", ["spf=pass", "arc=fail (i=1 broken)"])
    assert isinstance(arc.aar_value("mx.example; spf", "mx.example", "none"), arc.SealProblem)

