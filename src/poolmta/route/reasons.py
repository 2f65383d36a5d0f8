"""route.reasons - the closed set of reason codes a routing decision can carry

The trace, the CLI, `poolmta route` and the docs all use these names; they
are stable: an operator's alerting may match on them. Each member carries a
one-line description (``Reason.DSN.doc``).

SEE ALSO: route/rules.py, route/decide.py
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    def __new__(cls, value: str, doc: str):
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.doc = doc
        return obj

    DSN = ("dsn",
           "A delivery status notification or bounce (null reverse-path or multipart/report): backscatter risk.")
    SOURCE_DOMAIN_UNRESOLVABLE = ("source-domain-unresolvable",
                                  "The envelope sender's domain has no MX and no A/AAAA record in DNS.")
    SOURCE_DOMAIN_NULL_MX = ("source-domain-null-mx",
                             "The envelope sender's domain publishes a null MX (RFC 7505): it takes no mail.")
    SOURCE_DOMAIN_TEMPERROR = ("source-domain-temperror",
                               "The sender domain's DNS failed (SERVFAIL/timeout); not guessed: re-checked before delivery.")
    SPAM = ("spam",
            "A spam engine (or a trusted upstream verdict) judged the message spam.")
    SPAM_CHECK_FAILED = ("spam-check-failed",
                         "The spam engine did not answer; the tenant's on_engine_failure decided (high-risk here,"
                         " or only recorded when it is \"normal\").")
    LIMIT = ("limit",
             "A sending limit (service or outbound spam policy) is exceeded: recorded as limit:<name>.")
    RELAY_UNAUTHENTICATED = ("relay-unauthenticated",
                             "Forwarded or relayed mail whose envelope sender is not in an accepted domain of the relaying tenant.")
    FORWARD_AUTHENTICATED = ("forward-authenticated",
                             "Forwarded or relayed mail whose original sender passed SPF or aligned DKIM when it came in:"
                             " normal pool, envelope sender rewritten with SRS.")
    NORMAL = ("normal",
              "No risk rule matched: mail of the tenant's own domains.")
