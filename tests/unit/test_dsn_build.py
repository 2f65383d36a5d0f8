"""dsn.build: a golden RFC 3464 report, parsed back, and the RET / size / boundary rules.

Regenerate the golden file after an intended change with
    POOLMTA_REGEN_GOLDEN=1 python -m pytest tests/unit/test_dsn_build.py
and review the diff before committing it.
"""

import email
import os
from email import policy
from pathlib import Path

import pytest

from poolmta import replies
from poolmta.dsn.build import SUBJECT, build, status_for
from poolmta.model import Envelope, Message, Origin, Recipient

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "dsn"
RECEIVED = 1_800_000_000.0          # 2027-01-15 08:00:00 UTC
NOW = RECEIVED + 3600 * 5

ORIGINAL = (b"Received: from client.sender.test ([192.0.2.7])\r\n"
            b"\tby gw.test (poolmta) with ESMTPA id 0ABC; Fri, 15 Jan 2027 08:00:00 +0000\r\n"
            b"From: Alice <alice@sender.test>\r\n"
            b"To: bob@dest.test, carol@nullmx.test, dave@slow.test\r\n"
            b"Subject: quarterly report\r\n"
            b"Message-ID: <q1@sender.test>\r\n"
            b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=s1; h=from:to:subject;\r\n"
            b"\tbh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=abc\r\n"
            b"\r\n"
            b"Hello,\r\n"
            b".a line that starts with a dot\r\n"
            b"--B0UND4RY looks like a boundary but is not ours\r\n")


def message(ret="", envid="ENV-42", content=ORIGINAL, mail_from="alice@sender.test") -> Message:
    env = Envelope(mail_from, (Recipient("bob@dest.test", ("FAILURE",), "rfc822;bob@dest.test"),
                               Recipient("carol@nullmx.test"), Recipient("dave@slow.test")), ret=ret, envid=envid)
    return Message("0ABC", env, Origin("192.0.2.7", tenant="acme"), content, RECEIVED)


def statuses():
    return [
        status_for("bob@dest.test", state="bounced",
                   reply="550 5.1.1 <bob@dest.test>: Recipient address rejected: User unknown in virtual mailbox table",
                   status="5.1.1", remote_mta="mx.dest.test", orcpt="rfc822;bob@dest.test"),
        status_for("carol@nullmx.test", state="bounced", reply=str(replies.R550_5110_NULL_MX), status="5.1.10",
                   remote_mta=""),
        status_for("dave@slow.test", state="expired", reply="451 4.2.0 <dave@slow.test>: try again later",
                   status="", remote_mta="mx.slow.test"),
    ]


def golden_dsn() -> bytes:
    return build(message(), statuses(), hostname="gw.test", now=NOW, boundary="B0UND4RY.gw.test",
                 message_id="<0DSN@gw.test>")


def test_golden_basic():
    out = golden_dsn()
    path = GOLDEN / "basic.eml"
    if os.environ.get("POOLMTA_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(out)
    assert out == path.read_bytes(), "DSN output changed; if intended, regenerate with POOLMTA_REGEN_GOLDEN=1"


def test_output_is_crlf_only():
    out = golden_dsn()
    assert b"\r\n" in out
    assert out.count(b"\n") == out.count(b"\r\n")
    assert out.count(b"\r") == out.count(b"\r\n")


def test_parses_back_as_rfc3464():
    out = golden_dsn()
    m = email.message_from_bytes(out, policy=policy.default)
    assert m.get_content_type() == "multipart/report"
    assert m.get_param("report-type") == "delivery-status"
    assert m["From"].addresses[0].addr_spec == "MAILER-DAEMON@gw.test"
    assert m["To"] == "alice@sender.test"
    assert m["Subject"] == SUBJECT
    assert m["Auto-Submitted"] == "auto-replied"
    assert m["Message-ID"] == "<0DSN@gw.test>"
    assert m["Date"].datetime.timestamp() == NOW

    text, report, returned = m.iter_parts()
    assert text.get_content_type() == "text/plain"
    human = " ".join(text.get_content().split())          # the text is wrapped at 76 columns
    assert "<bob@dest.test>: host mx.dest.test said: 550 5.1.1" in human
    assert replies.R550_5110_NULL_MX.text in human                       # our own wording
    assert replies.R554_547_EXPIRED.text.split(":")[0] in human
    assert "451 4.2.0 <dave@slow.test>: try again" in human               # the last remote reply

    assert report.get_content_type() == "message/delivery-status"
    per_message, *per_rcpt = report.get_payload()
    assert per_message["Reporting-MTA"] == "dns; gw.test"
    assert per_message["X-Poolmta-Queue-ID"] == "0ABC"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["Arrival-Date"] == "Fri, 15 Jan 2027 08:00:00 +0000"
    assert [b["Final-Recipient"] for b in per_rcpt] == [
        "rfc822; bob@dest.test", "rfc822; carol@nullmx.test", "rfc822; dave@slow.test"]
    assert [b["Action"] for b in per_rcpt] == ["failed"] * 3
    assert [b["Status"] for b in per_rcpt] == ["5.1.1", "5.1.10", "5.4.7"]
    bob, carol, dave = per_rcpt
    assert bob["Original-Recipient"] == "rfc822;bob@dest.test"
    assert carol["Original-Recipient"] is None
    assert bob["Remote-MTA"] == "dns; mx.dest.test" and carol["Remote-MTA"] is None
    assert bob["Diagnostic-Code"] == ("smtp; 550 5.1.1 <bob@dest.test>: Recipient address rejected: "
                                      "User unknown in virtual mailbox table")
    assert carol["Diagnostic-Code"] == f"smtp; {replies.R550_5110_NULL_MX}"
    assert dave["Diagnostic-Code"] == "smtp; 451 4.2.0 <dave@slow.test>: try again later"
    assert dave["Last-Attempt-Date"] == "Fri, 15 Jan 2027 13:00:00 +0000"

    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload(0)
    assert inner["Subject"] == "quarterly report" and inner["Message-ID"] == "<q1@sender.test>"


def test_original_is_returned_byte_for_byte():
    out = golden_dsn()
    assert ORIGINAL in out                     # DKIM-Signature folding, dot line, all untouched
    assert out.endswith(ORIGINAL + b"\r\n--B0UND4RY.gw.test--\r\n")


def test_ret_hdrs_returns_headers_only():
    out = build(message(ret="HDRS"), statuses()[:1], hostname="gw.test", now=NOW)
    m = email.message_from_bytes(out, policy=policy.default)
    returned = list(m.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: quarterly report" in out and b"Hello," not in out


def test_large_message_returns_headers_only_even_with_ret_full():
    big = ORIGINAL + b"x" * 200 + b"\r\n"
    out = build(message(ret="FULL", content=big), statuses()[:1], hostname="gw.test", now=NOW, return_limit=len(big) - 1)
    assert b"Content-Type: text/rfc822-headers" in out and b"xxxx" not in out
    out = build(message(ret="FULL", content=big), statuses()[:1], hostname="gw.test", now=NOW, return_limit=len(big))
    assert b"Content-Type: message/rfc822" in out and b"x" * 200 in out


def test_boundary_never_occurs_in_the_returned_message():
    out = build(message(), statuses()[:1], hostname="gw.test", now=NOW, boundary="B0UND4RY")
    m = email.message_from_bytes(out, policy=policy.default)
    boundary = m.get_boundary()
    assert boundary != "B0UND4RY" and boundary.startswith("B0UND4RY.")
    assert len(list(m.iter_parts())) == 3


def test_no_envid_no_original_envelope_id():
    out = build(message(envid=""), statuses()[:1], hostname="gw.test", now=NOW)
    assert b"Original-Envelope-Id" not in out


def test_default_message_id_and_boundary_are_fresh():
    a = build(message(), statuses()[:1], hostname="gw.test", now=NOW)
    b = build(message(), statuses()[:1], hostname="gw.test", now=NOW)
    ma, mb = (email.message_from_bytes(x, policy=policy.default) for x in (a, b))
    assert ma["Message-ID"] != mb["Message-ID"] and ma["Message-ID"].endswith("@gw.test>")


def test_non_ascii_content_is_declared_8bit():
    out = build(message(content=b"Subject: caf\xc3\xa9\r\n\r\nd\xc3\xa9j\xc3\xa0\r\n"), statuses()[:1],
                hostname="gw.test", now=NOW)
    assert b"Content-Transfer-Encoding: 8bit" in out and b"d\xc3\xa9j\xc3\xa0" in out


def test_bare_lf_original_is_returned_with_crlf():
    out = build(message(content=b"Subject: x\n\nline\n"), statuses()[:1], hostname="gw.test", now=NOW)
    assert b"Subject: x\r\n\r\nline\r\n" in out and out.count(b"\n") == out.count(b"\r\n")


def test_status_for_maps_stored_state():
    expired = status_for("d@x", state="expired", reply="451 4.4.1 No answer from host", status="4.4.1",
                         remote_mta="")
    assert expired.status == "5.4.7" and expired.reason == replies.R554_547_EXPIRED.text
    assert expired.diag_text == "451 4.4.1 No answer from host" and expired.mta_type == ""
    remote = status_for("b@x", state="bounced", reply="550 5.1.1 no", status="5.1.1", remote_mta="mx.x")
    assert remote.reason == "" and remote.mta_type == "dns" and remote.diag_type == "smtp"
    ours = status_for("c@x", state="bounced", reply=str(replies.R550_512_NO_SUCH_DOMAIN), status="5.1.2",
                      remote_mta="")
    assert ours.reason == replies.R550_512_NO_SUCH_DOMAIN.text


def test_needs_a_status():
    with pytest.raises(ValueError):
        build(message(), [], hostname="gw.test", now=NOW)
