"""rewrite - apply a routing decision to the message (trace headers now; SRS and DKIM later)."""
