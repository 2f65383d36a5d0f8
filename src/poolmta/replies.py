"""replies - the catalogue of every SMTP reply poolmta puts on the wire or in a DSN

Every refusal, acceptance and failure poolmta emits is a named ``Reply``:
a three-digit code, an RFC 3463 enhanced status code and a human sentence.
Ingress answers clients with these; the DSN builder copies the same wording
into its Diagnostic-Code fields, so an operator sees one sentence everywhere.

TRUST: none; constants only.

STANDARDS: RFC 5321 §4.2 (reply codes), RFC 3463 (enhanced status codes),
RFC 2034 (ENHANCEDSTATUSCODES), RFC 7505 §4.2 (5.1.10 null MX).

SEE ALSO: ingress/handler.py, dsn/build.py, tests/unit/test_replies.py
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)


R220_GREETING = Reply(220, "", "poolmta ESMTP")  # greeting carries no enhanced code (RFC 2034 §3)
R221_BYE = Reply(221, "2.0.0", "Bye")
R235_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R250_OK = Reply(250, "2.0.0", "OK")
R250_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
R250_RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
R250_QUEUED = Reply(250, "2.0.0", "Queued as {queue_id}")
R250_RESET = Reply(250, "2.0.0", "Reset state")
R354_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")

R421_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
R451_LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
R451_SPOOL_ERROR = Reply(451, "4.3.0", "Could not queue the message, try again later")
R452_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
R454_TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")

R500_SYNTAX = Reply(500, "5.5.2", "Syntax error, command unrecognized")
R500_LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
R501_SYNTAX_PARAM = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
R501_BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
R503_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
R504_PARAM_NOT_IMPL = Reply(504, "5.5.4", "Command parameter not implemented")
R530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
R535_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R538_ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
R550_511_UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
R550_518_RESTRICTED_SENDER = Reply(550, "5.1.8", "Access denied, bad outbound sender")
R550_571_RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
R552_534_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
R553_513_BAD_ADDRESS = Reply(553, "5.1.3", "Malformed address")
R554_560_BARE_NEWLINE = Reply(554, "5.6.0", "Message refused: bare <CR> or <LF> in data; lines must end with <CR><LF>")
R555_PARAM_UNKNOWN = Reply(555, "5.5.4", "Unsupported MAIL FROM or RCPT TO parameter")
# Ingress additions (issue #2).
R220_TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
R421_470_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentication attempts, closing connection")
R452_453_OTHER_TENANT = Reply(452, "4.5.3", "Recipients of another tenant must be sent in a separate transaction")
R553_567_NON_ASCII = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
R550_571_ADDRESS_LITERAL = Reply(550, "5.7.1", "Address literals are not accepted as recipients")

R554_546_TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (Received headers): probable mail loop")
R554_546_FORWARD_LOOP = Reply(554, "5.4.6", "Mail forwarding loop: this message was already forwarded for this address")

R550_57520_FORWARDING_DISABLED = Reply(550, "5.7.520", "Access denied, Your organization does not allow external forwarding")
R550_511_BAD_SRS = Reply(550, "5.1.1", "Recipient address rejected: not a valid SRS address of ours")

R451_471_SPAM_CHECK_UNAVAILABLE = Reply(451, "4.7.1", "Content check temporarily unavailable, try again later")
R550_57711_CONNECTOR_RESTRICTED = Reply(550, "5.7.711", "Access denied, bad outbound sender: this connector is restricted")
R550_57233_TENANT_EXTERNAL_LIMIT = Reply(550, "5.7.233", "Your organization has exceeded its external recipient limit; external sending is refused")

# Delivery outcomes that poolmta itself produces (they appear in DSNs).
R550_5110_NULL_MX = Reply(550, "5.1.10", "Recipient domain publishes a null MX and accepts no mail")
R550_512_NO_SUCH_DOMAIN = Reply(550, "5.1.2", "Recipient domain does not exist in DNS")
R451_441_NO_ANSWER = Reply(451, "4.4.1", "No answer from host")
R451_443_DNS_TEMPFAIL = Reply(451, "4.4.3", "Temporary DNS failure resolving the destination")
R451_442_CONN_DROPPED = Reply(451, "4.4.2", "Connection dropped during the SMTP session")
R451_443_SOURCE_DNS_TEMPFAIL = Reply(451, "4.4.3", "Sender domain could not be checked in DNS yet; delivery waits for a definite answer")
R554_547_EXPIRED = Reply(554, "5.4.7", "Message expired: delivery was not possible within the queue lifetime")
R550_544_NO_ROUTE = Reply(550, "5.4.4", "Recipient domain has no mail exchanger with an address in DNS")
R451_475_TLS_FAILED = Reply(451, "4.7.5", "TLS negotiation with the remote host failed")
R451_435_NO_SOURCE = Reply(451, "4.3.5", "The delivery pool of this message is not configured; delivery waits")
R451_450_PROTOCOL = Reply(451, "4.5.0", "Unexpected reply from the remote host")
R451_441_CONN_REFUSED = Reply(451, "4.4.1", "Connection refused by host")
R451_440_LOCAL_BIND = Reply(451, "4.4.0", "Cannot bind pool source address")   # + address and why: a local problem
R451_444_NO_SOURCE_FAMILY = Reply(451, "4.4.4", "The delivery pool has no source address of the destination's address family; delivery waits")


def all_replies() -> dict[str, Reply]:
    """Every named reply in this module, for the catalogue self-check."""
    return {name: value for name, value in globals().items()
            if name.startswith("R") and isinstance(value, Reply)}
