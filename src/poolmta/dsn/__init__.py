"""dsn - delivery status notifications (RFC 3464) for recipients that failed or expired.

A DSN is a new message with a null reverse-path that re-enters the pipeline
and is routed like any other (rule "dsn": the high-risk pool).

SEE ALSO: dsn/build.py, deliver/scheduler.py
"""

from .build import build, status_for

__all__ = ["build", "status_for"]
