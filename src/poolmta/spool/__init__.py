"""spool - the durable queue: one record per message, one state per recipient."""

from .store import RecipientState, RecipientUpdate, Spool, StoredMessage, StoredRecipient, new_queue_id

__all__ = ["RecipientState", "RecipientUpdate", "Spool", "StoredMessage", "StoredRecipient", "new_queue_id"]
