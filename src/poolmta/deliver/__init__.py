"""deliver - take due recipients from the spool to their MX hosts, from a source of the message's pool.

scheduler.py runs the loop; mx.py finds the targets; client.py speaks SMTP
through an injectable Connector; outcome.py is the one place that decides
what a reply or an error means. Pools are configuration: nothing here knows
what a pool is for.

SEE ALSO: DESIGN.md §2 (deliver), spool/schedule.py, dsn/build.py
"""

from .client import Connector, FunctionConnector, SmtpReply, Stage, Transcript, transact
from .connection import SmtpConnector
from .mx import MxAnswer, Target, lookup
from .outcome import Deferred, Delivered, Failed, Outcome, classify, try_next
from .scheduler import Scheduler

__all__ = ["Connector", "Deferred", "Delivered", "Failed", "FunctionConnector", "MxAnswer",
           "Outcome", "Scheduler", "SmtpConnector", "SmtpReply", "Stage", "Target", "Transcript", "classify", "lookup", "transact",
           "try_next"]
