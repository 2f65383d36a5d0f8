"""ingress - the SMTP listener: who may hand us mail, and on what terms.

server.py speaks the protocol (aiosmtpd subclass, STARTTLS, DATA framing),
handler.py answers the hooks, acceptance.py decides (pure functions).
"""
