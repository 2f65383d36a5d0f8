"""route.reasons - the closed set of reason codes a routing decision can carry

The trace, the CLI, `poolmta route` and the docs all use these names; they
are stable: an operator's alerting may match on them.

SEE ALSO: route/rules.py, route/decide.py
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    DSN = "dsn"
    """A delivery status notification or bounce (null reverse-path or multipart/report): backscatter risk."""

    SOURCE_DOMAIN_UNRESOLVABLE = "source-domain-unresolvable"
    """The envelope sender's domain has no MX and no A/AAAA record in DNS."""

    SOURCE_DOMAIN_NULL_MX = "source-domain-null-mx"
    """The envelope sender's domain publishes a null MX (RFC 7505): it sends and receives no mail."""

    SOURCE_DOMAIN_TEMPERROR = "source-domain-temperror"
    """The sender domain's DNS failed (SERVFAIL/timeout); not guessed: re-checked before delivery."""

    SPAM = "spam"
    """A spam engine (or a trusted upstream verdict) judged the message spam."""

    RELAY_UNAUTHENTICATED = "relay-unauthenticated"
    """Forwarded or relayed mail whose original sender is not in an accepted domain of the relaying tenant."""

    NORMAL = "normal"
    """None of the risk rules matched: good mail from the tenant's own domain."""
