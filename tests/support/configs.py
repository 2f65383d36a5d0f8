"""Config text that several tests start from."""

# One pool of each role on distinct loopback addresses; add [tenants.*] to taste.
POOLS = """
[pools.n]
role = "normal"
sources = [{ address = "127.0.0.2", ehlo = "out1.example.net" }]
[pools.h]
role = "high-risk"
sources = [{ address = "127.0.0.3", ehlo = "hr1.example.net" }]
[pools.r]
role = "relay"
sources = [{ address = "127.0.0.4", ehlo = "rly1.example.net" }]
"""
