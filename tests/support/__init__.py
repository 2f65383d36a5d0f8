"""Test helpers that are real servers on loopback: a DNS server and SMTP sinks."""
