"""assess.spam - fact: the spam verdict on a message

Minimal in this release: the GTUBE test string (the standard anti-spam test
pattern) makes any message spam; an upstream ``X-Spam-Flag: YES`` header is
believed only when the message came from a connector configured as trusted
(anyone else could add or strip it). Real engines plug in here later.

TRUST: the content is untrusted; headers only from trusted connectors.

SEE ALSO: route/rules.py (rule "spam")
"""

from __future__ import annotations

from ..model import Message, SpamFact
from .dsn import headers

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


async def check(msg: Message, ctx=None) -> SpamFact:
    if GTUBE in msg.content:
        return SpamFact(True, "gtube", "GTUBE test string")
    if msg.origin.trusted_connector:
        flag = headers(msg.content).get("X-Spam-Flag", "")
        if str(flag).strip().upper() == "YES":
            return SpamFact(True, "upstream", f"X-Spam-Flag: YES from trusted connector {msg.origin.connector}")
    return SpamFact(False, "builtin")
