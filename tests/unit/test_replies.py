"""The reply catalogue checks itself, like aiosmtpd's statuscodes self-test."""

import re

from poolmta import replies


def test_names_match_codes_and_enhanced_class():
    allr = replies.all_replies()
    assert len(allr) > 20
    for name, r in allr.items():
        m = re.match(r"^R(\d{3})_", name)
        assert m, name
        assert int(m.group(1)) == r.code, name
        if r.enhanced:
            cls, subj, det = r.enhanced.split(".")
            assert int(cls) == r.code // 100, f"{name}: enhanced class {cls} vs code {r.code}"
            assert cls in "245" and subj.isdigit() and det.isdigit()
        else:
            assert r.code in (220, 354), f"{name} lacks an enhanced status code"
        assert r.text and (r.text[0].isupper() or r.code == 220)


def test_names_with_enhanced_in_name_agree():
    # R550_571_RELAY_DENIED → 5.7.1
    for name, r in replies.all_replies().items():
        m = re.match(r"^R\d{3}_(\d)(\d)(\d+)_", name)
        if m and r.enhanced:
            assert r.enhanced == f"{m.group(1)}.{m.group(2)}.{m.group(3)}", name


def test_str_is_wire_form():
    assert str(replies.R550_571_RELAY_DENIED) == "550 5.7.1 Relaying denied"
