"""DKIM verification (assess/inbound_auth.verify_dkim) against the Mail::DKIM corpus and dkimpy's fixtures.

The Mail::DKIM corpus (tests/data/dkim/mail-dkim) records Mail::DKIM's verdict
per message: pass, fail or invalid. Ours for a message is "pass" when any
signature passes, else "fail" when any fails, else "invalid" when there are
signatures but none could be checked (permerror, temperror, policy), else
"none" (no DKIM-Signature at all). The corpus is verified with the RFC 6376
minimums (512-bit keys and rsa-sha1 accepted, as Mail::DKIM does), because
most of it predates RFC 8301; the RFC 8301 policy we apply by default is
tested separately below.

Where RFC 6376 (or dkimpy) and Mail::DKIM disagree, the case is listed in
DISAGREEMENTS with our verdict and the reason, and the test checks that we
give exactly that verdict: the list is a statement, not a skip list.
"""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import dkim
import pytest

from poolmta.assess.inbound_auth import verify_dkim
from poolmta.dns import Rcode, StaticResolver

DATA = Path(__file__).resolve().parent.parent / "data" / "dkim"
MAIL_DKIM = DATA / "mail-dkim"
DKIMPY = DATA / "dkimpy"

_DRAFT = "pre-RFC draft signature (no v= tag, or v=0.5): RFC 6376 §3.5 requires v=1, so permerror"
_DRAFT_FAIL = _DRAFT + " (Mail::DKIM checks the draft signature and finds it broken)"
_DK = "DomainKeys (RFC 4870) signature only: not DKIM, dkimpy does not implement it, so no DKIM result"
_DK_BAD = _DK + " (Mail::DKIM finds the DomainKeys signature invalid; unauthenticated either way)"
_G = "key g= tag: RFC 4871 only; RFC 6376 removed it (verifiers ignore unknown key tags), so the signature passes"

DISAGREEMENTS: dict[str, tuple[str, str]] = {
    # file: (our verdict, why it differs from Mail::DKIM's)
    # -- pre-RFC drafts (draft-ietf-dkim-base-00/-01/-05 and allman-00)
    "good_ietf00_1.txt": ("invalid", _DRAFT),
    "good_ietf00_2.txt": ("invalid", _DRAFT),
    "good_ietf00_3.txt": ("invalid", _DRAFT),
    "good_ietf00_4.txt": ("invalid", _DRAFT),
    "good_ietf00_5.txt": ("invalid", _DRAFT),
    "mine_ietf01_1.txt": ("invalid", _DRAFT),
    "mine_ietf01_2.txt": ("invalid", _DRAFT),
    "mine_ietf01_3.txt": ("invalid", _DRAFT),
    "mine_ietf01_4.txt": ("invalid", _DRAFT),
    "mine_ietf05_1.txt": ("invalid", _DRAFT),
    "good_ietf01_1.txt": ("invalid", _DRAFT),
    "good_ietf01_2.txt": ("invalid", _DRAFT),
    "multiple_1.txt": ("invalid", _DRAFT),
    "no_body_1.txt": ("invalid", _DRAFT),
    "no_body_2.txt": ("invalid", _DRAFT),
    "no_body_3.txt": ("invalid", _DRAFT),
    "bad_ietf01_1.txt": ("invalid", _DRAFT_FAIL),
    "bad_ietf01_2.txt": ("invalid", _DRAFT_FAIL),
    "bad_ietf01_3.txt": ("invalid", _DRAFT_FAIL),
    "bad_1.txt": ("invalid", _DRAFT_FAIL),
    # -- DomainKeys
    "good_dk_gmail.txt": ("none", _DK),
    "good_dk_yahoo.txt": ("none", _DK),
    "good_dk_1.txt": ("none", _DK),
    "good_dk_2.txt": ("none", _DK),
    "good_dk_3.txt": ("none", _DK),
    "good_dk_4.txt": ("none", _DK),
    "good_dk_5.txt": ("none", _DK),
    "good_dk_6.txt": ("none", _DK),
    "good_dk_7.txt": ("none", _DK),
    "dk_headers_1.txt": ("none", _DK),
    "dk_headers_2.txt": ("none", _DK),
    "dk_multiple_1.txt": ("none", _DK),
    "bad_dk_1.txt": ("none", _DK_BAD),
    "bad_dk_2.txt": ("none", _DK_BAD),
    "bad_dk_3.txt": ("none", _DK_BAD),
    "bad_dk_4.txt": ("none", _DK_BAD),
    "bad_dk_5.txt": ("none", _DK_BAD),
    # -- the key g= tag (RFC 4871 §3.6.1), gone from RFC 6376
    "badkey_8.txt": ("pass", _G + " (g= does not match i=)"),
    "badkey_9.txt": ("pass", _G + " (empty g=, which RFC 4871 made match nothing)"),
    "badkey_12.txt": ("pass", _G + " (g= differs from i= by case)"),
    "badkey_13.txt": ("pass", _G + " (g= matches From but not i=)"),
    # -- dkimpy 1.1.8 gaps: RFC 6376 agrees with Mail::DKIM here, dkimpy does not
    "good_83176.txt": ("invalid", "q=foo/bar:dns/txt:exam/ple: RFC 6376 §3.5 says unknown query methods are"
                                  " ignored, dkimpy requires q= to be exactly dns/txt"),
    "good_qp_2.txt": ("invalid", "i= in dkim-quoted-printable (=2E): RFC 6376 §3.5 says decode it, dkimpy"
                                 " compares it undecoded with d="),
    "good_qp_3.txt": ("invalid", "i= in dkim-quoted-printable (=40): as above"),
}


def fake_dns() -> StaticResolver:
    zone = {}
    for line in (MAIL_DKIM / "FAKE_DNS.dat").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        value = value.strip()
        if value == "NXDOMAIN":
            continue
        if value.startswith("~~"):
            zone[(name, "TXT")] = Rcode.TEMPERROR
        else:
            zone[(name, "TXT")] = ("" if value == '""' else value,)
    return StaticResolver(zone)


def verdict(results) -> str:
    if not results:
        return "none"
    for r in ("pass", "fail"):
        if any(x.result == r for x in results):
            return r
    return "invalid"


def corpus_rows() -> list[dict]:
    with open(MAIL_DKIM / "expected.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


async def test_mail_dkim_corpus():
    resolver = fake_dns()
    rows = corpus_rows()
    agree, listed, wrong = 0, 0, []
    for row in rows:
        results = await verify_dkim((MAIL_DKIM / "corpus" / row["file"]).read_bytes(), resolver,
                                    minkey=512, allow_sha1=True)
        got = verdict(results)
        want, why = DISAGREEMENTS.get(row["file"], (row["expected"], ""))
        if got != want:
            wrong.append(f"{row['file']}: Mail::DKIM {row['expected']}, expected of us {want}"
                         f"{' (' + why + ')' if why else ''}, got {got}: "
                         + "; ".join(f"{r.selector}._domainkey.{r.domain} {r.result} {r.detail}" for r in results))
        elif why:
            listed += 1
        else:
            agree += 1
    assert len(rows) == 79
    assert not wrong, (f"Mail::DKIM corpus: {agree} agree, {listed} listed disagreements hold, {len(wrong)} wrong"
                       f" of {len(rows)}:\n" + "\n".join(wrong))
    assert set(DISAGREEMENTS) <= {r["file"] for r in rows}
    assert (agree, listed) == (35, 44), f"{agree} agree with Mail::DKIM, {listed} listed disagreements"


async def test_every_signature_is_verified_not_only_the_first():
    # multiple_2: four signatures: an unknown c=, a good one, a broken one, a tag-list syntax error.
    results = await verify_dkim((MAIL_DKIM / "corpus" / "multiple_2.txt").read_bytes(), fake_dns(),
                                minkey=512, allow_sha1=True)
    assert [r.result for r in results] == ["permerror", "pass", "fail", "permerror"], results
    assert "c=" in results[0].detail and "does not parse" in results[3].detail


async def test_dns_failures_are_temperror_and_missing_keys_permerror():
    r14 = await verify_dkim((MAIL_DKIM / "corpus" / "badkey_14.txt").read_bytes(), fake_dns(), minkey=512,
                            allow_sha1=True)
    r1 = await verify_dkim((MAIL_DKIM / "corpus" / "badkey_1.txt").read_bytes(), fake_dns(), minkey=512,
                           allow_sha1=True)
    assert [r.result for r in r14] == ["temperror"]
    assert [r.result for r in r1] == ["permerror"] and "no key" in r1[0].detail


async def test_rfc8301_policy_by_default():
    # goodkey_1: rsa-sha1 with a 512-bit key. Verifies under RFC 6376 minimums, not by default.
    content = (MAIL_DKIM / "corpus" / "goodkey_1.txt").read_bytes()
    lax = await verify_dkim(content, fake_dns(), minkey=512, allow_sha1=True)
    strict = await verify_dkim(content, fake_dns())
    assert [r.result for r in lax] == ["pass"]
    assert [r.result for r in strict] == ["policy"], strict


# ---- dkimpy's own fixtures ----------------------------------------------------

RFC8463_BRISBANE = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="   # RFC 8463 Appendix A.2


def dkimpy_dns() -> StaticResolver:
    return StaticResolver({
        ("brisbane._domainkey.football.example.com", "TXT"): (RFC8463_BRISBANE,),
        ("test._domainkey.football.example.com", "TXT"): ((DKIMPY / "test.txt").read_text().strip(),),
        ("test._domainkey.example.com", "TXT"): ((DKIMPY / "test.txt").read_text().strip(),),
        ("sed._domainkey.test.ex", "TXT"): ((DKIMPY / "eximtest.dns").read_text().strip(),),
    })


@pytest.mark.parametrize("name, want", [
    ("rfc6376.signed.msg", [("brisbane", "pass"), ("test", "pass")]),       # Ed25519 (RFC 8463) + RSA
    ("rfc6376.signed.rsa.msg", [("test", "pass")]),
    ("rfc6376.signed.no_t.msg", [("test", "fail")]),    # the signature header was edited after signing
    ("ed25519test2.msg", [("sed", "pass")]),            # Exim's Ed25519 signature
    ("rfc6376.msg", []),                                # unsigned
])
async def test_dkimpy_fixtures(name, want):
    results = await verify_dkim((DKIMPY / name).read_bytes(), dkimpy_dns())
    assert [(r.selector, r.result) for r in results] == want, results


async def test_sign_then_verify_round_trip_and_a_changed_body_fails():
    message = (DKIMPY / "rfc6376.msg").read_bytes()
    sig = dkim.sign(message, b"test", b"example.com", (DKIMPY / "test.private").read_bytes(),
                    canonicalize=(b"relaxed", b"relaxed"))
    ok = await verify_dkim(sig + message, dkimpy_dns())
    bad = await verify_dkim(sig + message.replace(b"hungry", b"thirsty"), dkimpy_dns())
    assert [(r.domain, r.result) for r in ok] == [("example.com", "pass")]
    assert [r.result for r in bad] == ["fail"] and "body hash" in bad[0].detail


async def test_verification_runs_off_the_event_loop():
    # The loop keeps turning while signatures are verified: a ticker advances meanwhile.
    content = (MAIL_DKIM / "corpus" / "multiple_2.txt").read_bytes() * 1
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    try:
        for _ in range(20):
            await verify_dkim(content, fake_dns(), minkey=512, allow_sha1=True)
    finally:
        t.cancel()
    assert ticks > 20
