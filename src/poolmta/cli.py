"""cli - the `poolmta` command: parse arguments, call one function per subcommand

  poolmta serve [--config FILE]
  poolmta config check FILE | config params | config defaults
  poolmta hash-password [--stdin]
  poolmta dkim keygen|rotate|show DOMAIN [--selector S] [--algorithm A]
  poolmta senders list | release ADDRESS | restrict ADDRESS [--connector] [--until-released]
  poolmta route MESSAGE.eml --mail-from A --rcpt B [--rcpt C] [--client-ip IP] [--auth-user U] [--config F] [--json]
  poolmta route --rules
  poolmta trace [QUEUE-ID | --message-id ID | --sender A | --recipient B] [--json] [--config F]
  poolmta queue list|show ID|retry [ID|--all]|delete ID [--config F] [--json]

SEE ALSO: app.py, config.py, trace/query.py
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def _load_config(path: str | None):
    from .config import ConfigError, load
    path = path or os.environ.get("POOLMTA_CONFIG") or None
    try:
        return load(path)
    except ConfigError as e:
        print(f"poolmta: configuration error\n{e}", file=sys.stderr)
        sys.exit(2)


def _setup_logging(level: str) -> None:
    # The logging HOWTO's "Optimization": the format uses none of these, and the trace
    # writes several records per message (finding the caller's frame alone was 1 % of CPU).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)   # aiosmtpd's per-command chatter


# ---- serve ---------------------------------------------------------------------

def _run_event_loop(main) -> None:
    """Run the gateway on uvloop (libuv: the transports, timers and thread hand-offs
    of every SMTP session cost about half as much CPU as in asyncio's own loop),
    falling back to asyncio's loop where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def cmd_serve(args) -> int:
    import dataclasses
    from .app import serve
    cfg = _load_config(args.config)
    if args.data_dir:
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, data_dir=args.data_dir))
    if args.listen:
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, listen=args.listen))
    _setup_logging(args.log_level)
    from .config import check_host
    host_problems = check_host(cfg)
    if host_problems:
        print("poolmta: cannot start:\n" + "\n".join(f"{cfg.source_file}: error: {p.key}: {p.message}"
                                                   for p in host_problems), file=sys.stderr)
        return 2
    os.umask(0o077)            # the spool holds other people's mail: owner-only, like Postfix's queue
    try:
        Path(cfg.server.data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"poolmta: cannot create server.data_dir {cfg.server.data_dir}: {e.strerror}; "
              f"set server.data_dir in the config or pass --data-dir", file=sys.stderr)
        return 2

    from . import master
    master.limit_malloc_arenas()               # before any thread: the workers inherit it
    try:
        lock = master.lock_spool(cfg.server.data_dir)      # held until the last worker exits
    except master.SpoolBusy as e:
        print(f"poolmta: cannot start: {e}", file=sys.stderr)
        return 1
    workers = master.worker_count(cfg.server.workers)
    host = cfg.server.listen.rsplit(':', 1)[0]

    def ready(gw):
        print(f"poolmta: listening on {host}:{gw.ingress.port}; "
              f"spool {cfg.server.data_dir}; config {cfg.source_file}", file=sys.stderr, flush=True)
    if workers == 1:
        try:
            _run_event_loop(serve(cfg, ready))
        except OSError as e:
            print(f"poolmta: cannot start: {e}", file=sys.stderr)
            return 1
        finally:
            lock.close()
        return 0

    from .ingress.server import listen_address
    bind_host, port = listen_address(cfg.server.listen)
    reserved = None
    if port == 0:                        # one port for all workers, picked now
        reserved = master.reserve_port(bind_host)
        port = reserved.getsockname()[1]
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, listen=f"{host}:{port}"))

    from .spool.sqlite import prepare as prepare_spool
    from .state.open import prepare_state
    prepare_spool(cfg.server.data_dir)            # once, before the workers open the files
    prepare_state(cfg)

    def worker_main(number: int, tell_ready) -> int:
        from .spool.store import set_worker
        set_worker(number)
        try:
            _run_event_loop(serve(cfg, lambda gw: tell_ready(), worker=number, workers=workers))
        except OSError as e:
            print(f"poolmta: worker {number} cannot start: {e}", file=sys.stderr)
            return 1
        return 0

    def all_ready():
        print(f"poolmta: listening on {host}:{port} with {workers} workers; "
              f"spool {cfg.server.data_dir}; config {cfg.source_file}", file=sys.stderr, flush=True)
    try:
        return master.run(workers, worker_main, all_ready)
    finally:
        if reserved is not None:
            reserved.close()
        lock.close()


# ---- config --------------------------------------------------------------------

def cmd_config(args) -> int:
    from . import config
    if args.action == "check":
        if not args.file:
            print("poolmta config check: name the file to check", file=sys.stderr)
            return 2
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except OSError as e:
            print(f"{args.file}: cannot read: {e.strerror}", file=sys.stderr)
            return 2
        problems = config.check_text(text, args.file)
        if not any(p.severity == "error" for p in problems):
            lines = config._Lines(text)
            cfg = config.loads(text, args.file)
            problems += [config.Problem(p.key, p.message, "warning", lines.find(p.key), args.file)
                         for p in config.check_host(cfg)]
            if cfg.dkim.sign:
                from .rewrite import keys
                accepted = [d for t in cfg.tenants.values() for d in t.accepted_domains]
                problems += [config.Problem("dkim", text.removeprefix("dkim: "), "warning", lines.find("dkim"), args.file)
                             for text in keys.problems(keys.key_dir_of(cfg), accepted)]
        for p in problems:
            print(p)
        errors = sum(p.severity == "error" for p in problems)
        warnings = len(problems) - errors
        print(f"{args.file}: {errors} error(s), {warnings} warning(s)")
        return 1 if errors else 0
    if args.action == "params":
        for section, key, default, doc in config.documented_fields():
            if section == "":
                print(f"\n# [{key}{'.NAME' if key in ('pools', 'tenants') else ''}]  {doc}")
                continue
            section = (section.replace("pools", "pools.NAME", 1).replace("tenants", "tenants.NAME", 1)
                       .replace(".sources", ".sources[]").replace(".users", ".users[]")
                       .replace(".connectors", ".connectors[]"))
            print(f"{section}.{key} = {_toml_value(default)}\n    {doc}")
        return 0
    if args.action == "defaults":
        print(config.DEFAULT_TOML, end="")
        return 0
    return 2


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def cmd_hash_password(args) -> int:
    from .tenancy import hash_password
    if args.stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != pw:
            print("poolmta: passwords differ", file=sys.stderr)
            return 1
    if not pw:
        print("poolmta: empty password refused", file=sys.stderr)
        return 1
    print(hash_password(pw))
    return 0


# ---- dkim ----------------------------------------------------------------------

def cmd_dkim(args) -> int:
    from .rewrite import keys
    cfg = _load_config(args.config)
    key_dir = keys.key_dir_of(cfg)
    accepted = {d for t in cfg.tenants.values() for d in t.accepted_domains}
    domain = args.domain.rstrip(".").lower()
    if domain not in accepted:
        print(f"poolmta dkim: warning: {domain} is not an accepted domain in {cfg.source_file}; "
              "nothing will be signed with this key", file=sys.stderr)
    os.umask(0o077)
    try:
        if args.action == "keygen":
            made = keys.keygen(key_dir, domain, args.selector, args.algorithm or cfg.dkim.algorithm, force=args.force)
            print(made)
            print(f"active selector of {domain}: {keys.active_selector(key_dir, domain)}")
        elif args.action == "rotate":
            old = keys.active_selector(key_dir, domain)
            new = keys.rotate(key_dir, domain)
            print(f"{domain}: signing with {new} from now on (was {old}).\n"
                  f"Keep the TXT record of {old} published until mail signed with it has been delivered"
                  f" (a few days).")
        else:   # show
            k = keys.active_key(key_dir, domain)
            print(k)
            if isinstance(k, keys.KeyProblem):
                return 1
            print(keys.zone_line(keys.record_name(domain, k.selector), keys.public_record(k)))
    except keys.KeyStoreError as e:
        print(f"poolmta dkim: {e}", file=sys.stderr)
        return 1
    return 0


# ---- senders -----------------------------------------------------------------

def cmd_senders(args) -> int:
    cfg = _load_config(args.config)
    return asyncio.run(_senders(cfg, args))


async def _senders(cfg, args) -> int:
    """Restricted senders and connectors, in the state every node shares."""
    from .state import Restriction, utc_day_start
    from .state.open import open_state
    state = open_state(cfg)
    now, who = time.time(), getpass.getuser()
    kind = "connector" if args.connector else "user"
    try:
        if args.action == "list":
            rs = await state.restrictions(now)
            if args.json:
                print(json.dumps([dataclasses.asdict(r) for r in rs], indent=2))
                return 0
            for r in rs:
                until = "until released" if r.until is None else f"until {_fmt_ts(r.until)}"
                print(f"{r.kind:<9} {r.sender:<40} {until:<32} since {_fmt_ts(r.since)}  {r.reason}"
                      + (f"  tenant {r.tenant}" if r.tenant else ""))
            print(f"-- {len(rs)} restricted (state: {cfg.state.backend})")
            return 0
        if not args.sender:
            print(f"poolmta senders {args.action}: name the sender (an address, or a connector with --connector)",
                  file=sys.stderr)
            return 2
        sender = args.sender.lower() if kind == "user" else args.sender
        if args.action == "release":
            if not await state.release(kind, sender, now, who):
                print(f"poolmta: {kind} {sender} is not restricted", file=sys.stderr)
                return 1
            _audit(cfg, sender, "sender-released", kind=kind, by=who)
            print(f"released {kind} {sender} (by {who}); it will not be restricted again today (UTC)")
            return 0
        if args.action == "restrict":
            until = None if args.until_released else utc_day_start(now) + 86400
            ok = await state.restrict(Restriction(kind, sender, now, until, f"administrator ({who})"))
            _audit(cfg, sender, "sender-action", kind=kind, actions=["restricted:administrator"], by=who)
            print(f"restricted {kind} {sender} " + ("until released" if until is None else "until the end of the UTC day")
                  if ok else f"{kind} {sender} was already restricted")
            return 0
        return 2
    finally:
        await state.close()


def _audit(cfg, sender: str, event: str, **data) -> None:
    """Record an administrator's action in the trace (queue id "sender:ADDRESS")."""
    from pathlib import Path as _P
    import sqlite3
    db = _P(cfg.server.data_dir) / "spool.db"
    if not db.exists():
        return
    con = sqlite3.connect(db, timeout=30)
    with con:
        con.execute("INSERT INTO events(queue_id, ts, kind, data) VALUES (?,?,?,?)",
                    (f"sender:{sender}", time.time(), event, json.dumps(data)))
    con.close()


# ---- route ---------------------------------------------------------------------

def cmd_route(args) -> int:
    from .route.reasons import Reason
    from .route.rules import table
    if args.rules:
        for order, code, role, summary in table():
            print(f"{order}. {code:<28} -> {role:<9}  {summary}")
        return 0
    if not args.message or not args.rcpt or args.mail_from is None:
        print("poolmta route: give MESSAGE.eml, --mail-from and at least one --rcpt (or --rules)", file=sys.stderr)
        return 2
    cfg = _load_config(args.config)
    result = asyncio.run(_route(cfg, args))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"pool:     {result['decision']['pool']} ({result['decision']['role']})")
    print("reasons:")
    for r in result["decision"]["reasons"]:
        print(f"  - {r}: {Reason(r.split(':')[0]).doc}")
    if result["decision"]["recheck"]:
        print(f"recheck before delivery: {', '.join(result['decision']['recheck'])}")
    print(f"tenant:   {result['origin']['tenant'] or '(none)'}")
    f = result["facts"]
    print("facts:")
    print(f"  dsn:            {f['dsn']['is_dsn']} {f['dsn']['why']}")
    print(f"  source domain:  {f['source_domain']['domain'] or '(null sender)'}: {f['source_domain']['state']}"
          f" {f['source_domain']['detail']}")
    print(f"  spam:           {f['spam']['is_spam']} ({f['spam']['engine']}) {f['spam']['detail']}")
    print(f"  forwarded:      {f['forwarded']['forwarded']} (sender domain {f['forwarded']['sender_domain'] or '-'},"
          f" {f['forwarded']['external_recipients']} external recipient(s))")
    return 0


async def _route(cfg, args) -> dict:
    from dataclasses import asdict
    from .assess import Context
    from .clock import SystemClock
    from .dns import make_resolver
    from .model import Envelope, Message, Origin, Recipient
    from .pipeline import Pipeline
    from .route import Policy
    from .tenancy import Directory

    clock = SystemClock()
    directory = Directory(cfg)
    resolver = make_resolver(cfg.dns.nameservers, cfg.dns.timeout, cfg.dns.cache_ttl_max, clock)
    raw = Path(args.message).read_bytes() if args.message != "-" else sys.stdin.buffer.read()
    content = _crlf(raw)
    mail_from = args.mail_from.strip("<>")
    tenant, connector, trusted = "", "", False
    if args.auth_user:
        tenant = directory.tenant_of_user(args.auth_user)
        if not tenant:
            print(f"poolmta route: warning: {args.auth_user} is not a user of any tenant in {cfg.source_file}; "
                  "the server would refuse its AUTH", file=sys.stderr)
    elif args.client_ip and (m := directory.connector_for(args.client_ip)):
        tenant, connector, trusted = m.tenant, m.name, m.trusted
    if not tenant:
        tenant = directory.tenant_for_route(mail_from, args.rcpt)
    origin = Origin(client_ip=args.client_ip or "127.0.0.1", auth_user=args.auth_user or "", tenant=tenant,
                    connector=connector, trusted_connector=trusted, kind="cli")
    env = Envelope(mail_from, tuple(Recipient(r) for r in args.rcpt))
    msg = Message("ROUTE", env, origin, content, clock.now())
    pipe = Pipeline(Context(resolver, directory, cfg.auth, cfg.server.hostname, cfg.spam), Policy(cfg.pool_for_role()),
                    None, None,
                    clock, cfg.server.hostname)
    facts, decision = await pipe.decide(msg)
    return {"decision": decision.to_dict(), "facts": facts.to_dict(), "origin": asdict(origin)}


def _crlf(raw: bytes) -> bytes:
    if raw.startswith(b"From ") and b"\n" in raw:          # an mbox "From " envelope line
        raw = raw.split(b"\n", 1)[1]
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# ---- trace and queue -----------------------------------------------------------

def _fmt_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def cmd_trace(args) -> int:
    from .trace import query
    cfg = _load_config(args.config)
    try:
        con = query.open_readonly(cfg.server.data_dir)
    except FileNotFoundError as e:
        print(f"poolmta: {e}", file=sys.stderr)
        return 1
    if args.queue_id:
        ids = [args.queue_id]
    else:
        ids = query.find(con, message_id=args.message_id or "", sender=args.sender or "",
                         recipient=args.recipient or "", limit=args.limit)
    out = []
    for qid in ids:
        events = query.timeline(con, qid)
        if not events:
            continue
        out.append({"queue_id": qid, "summary": query.summary(con, qid), "events": events})
    if not out:
        print(f"poolmta: no matching message in the trace (spool {cfg.server.data_dir}, config {cfg.source_file})",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out if not args.queue_id else out[0], indent=2, default=str))
        return 0
    for m in out:
        print(f"== {m['queue_id']}  pool={m['summary'].get('routed', '?')}  reasons={','.join(m['summary'].get('reasons', []))}")
        for ev in m["events"]:
            data = {k: v for k, v in ev.items() if k not in ("ts", "event")}
            print(f"  {_fmt_ts(ev['ts'])}  {ev['event']:<14} {_compact(data)}")
    return 0


def _compact(data: dict) -> str:
    parts = []
    for k, v in data.items():
        if v in ("", None, [], {}, False) and k not in ("is_dsn",):
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v, separators=(",", ":"), default=str)
        parts.append(f"{k}={v}")
    return " ".join(parts)


def cmd_queue(args) -> int:
    cfg = _load_config(args.config)
    if not (Path(cfg.server.data_dir) / "spool.db").exists():
        print(f"poolmta: no spool at {cfg.server.data_dir} (config {cfg.source_file})", file=sys.stderr)
        return 1
    if args.action in ("show", "delete") and not args.queue_id:
        print(f"poolmta queue {args.action}: give a queue id", file=sys.stderr)
        return 2
    if args.action == "retry" and not (args.queue_id or args.all):
        print("poolmta queue retry: give a queue id or --all", file=sys.stderr)
        return 2
    return asyncio.run(_queue(cfg, args))


async def _queue(cfg, args) -> int:
    """The operator's queue commands, through the same Spool API the gateway uses."""
    from .clock import SystemClock
    from .spool.sqlite import SQLiteSpool
    from .trace import EventKind, Recorder
    from .trace import query

    spool = SQLiteSpool(cfg.server.data_dir)
    trace = Recorder(SystemClock(), spool)
    who = getpass.getuser()
    try:
        if args.action == "list":
            entries = await spool.list(limit=args.limit)
            if args.json:
                print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
                return 0
            now = time.time()
            for e in entries:
                print(f"{e.queue_id}  {e.size:>8}  {_fmt_ts(e.received_at)}  {e.pool:<10} <{e.mail_from}>")
                for addr, state, reply, attempts, next_at in e.recipients:
                    if state not in ("queued", "deferred"):
                        continue
                    due = "now" if next_at <= now else f"in {_ago(next_at - now)}"
                    print(f"      {addr}  {state} after {attempts} attempt(s), next {due}"
                          + (f"\n        ({reply})" if reply else ""))
            print(f"-- {len(entries)} message(s) in queue (spool {cfg.server.data_dir})")
            return 0
        if args.action == "show":
            con = query.open_readonly(cfg.server.data_dir)
            row = query.message_row(con, args.queue_id)
            con.close()
            if row is None:
                print(f"poolmta: no message {args.queue_id} (spool {cfg.server.data_dir})", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(row, indent=2))
                return 0
            d = row["decision"]
            print(f"queue id:   {row['queue_id']}\nreceived:   {_fmt_ts(row['received_at'])}\n"
                  f"from:       <{row['mail_from']}>\nmessage-id: {row['message_id'] or '-'}\n"
                  f"size:       {row['size']}\npool:       {row['pool']} ({d['role']}), reasons: "
                  f"{', '.join(d['reasons'])}")
            for r in row["recipients"]:
                print(f"  {r['address']}: {r['state']}, {r['attempts']} attempt(s)"
                      + (f", last: {r['last_reply']}" if r["last_reply"] else "")
                      + (f" [{r['remote_mta']}]" if r["remote_mta"] else ""))
            return 0
        if args.action == "retry":
            n = await spool.retry(None if args.all else args.queue_id, time.time())
            trace.record("*" if args.all else args.queue_id, EventKind.RETRY_REQUESTED, by=who, recipients=n)
            print(f"{n} recipient(s) scheduled for immediate retry")
            return 0
        if args.action == "delete":
            n = await spool.delete(args.queue_id)
            if not n:
                print(f"poolmta: nothing pending for {args.queue_id} (spool {cfg.server.data_dir})", file=sys.stderr)
                return 1
            trace.record(args.queue_id, EventKind.DELETED, by=who, recipients=n)
            print(f"deleted {args.queue_id}: {n} pending recipient(s) dropped, no DSN sent")
            return 0
        return 2
    finally:
        trace.flush()                # the events ride the spool's last commit
        await spool.close()


def _ago(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ---- argument parsing ----------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="poolmta", description="Outbound mail gateway with delivery pools.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="TOML config (default: $POOLMTA_CONFIG, else the embedded defaults)")
    s.add_argument("--data-dir", help="override server.data_dir")
    s.add_argument("--listen", help="override server.listen")
    s.add_argument("--log-level", default="info")
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("config", help="check or document configuration")
    c.add_argument("action", choices=["check", "params", "defaults"])
    c.add_argument("file", nargs="?")
    c.set_defaults(fn=cmd_config)

    h = sub.add_parser("hash-password", help="hash a password for tenants.*.users[].password_hash")
    h.add_argument("--stdin", action="store_true", help="read the password from standard input")
    h.set_defaults(fn=cmd_hash_password)

    sd = sub.add_parser("senders", help="restricted senders: list, release, restrict",
                        description="Senders (and connectors) restricted by sending limits, spam volume or an"
                                    " administrator, in the state shared by every node ([state]).")
    sd.add_argument("action", choices=["list", "release", "restrict"])
    sd.add_argument("sender", nargs="?", help="an address, or a connector name with --connector")
    sd.add_argument("--connector", action="store_true", help="the sender is a connector name")
    sd.add_argument("--until-released", action="store_true", help="with restrict: until released (default: today)")
    sd.add_argument("--json", action="store_true")
    sd.add_argument("--config")
    sd.set_defaults(fn=cmd_senders)

    k = sub.add_parser("dkim", help="DKIM signing keys: keygen, rotate, show",
                       description="Keys live in dkim.key_dir (default DATA_DIR/dkim): DOMAIN/SELECTOR.key and"
                                   " DOMAIN/active. Two selectors per domain let you rotate.")
    k.add_argument("action", choices=["keygen", "rotate", "show"])
    k.add_argument("domain")
    k.add_argument("--selector", default="selector1", help="with keygen: selector1 or selector2")
    k.add_argument("--algorithm", choices=["rsa-sha256", "ed25519-sha256"], help="default: dkim.algorithm")
    k.add_argument("--force", action="store_true", help="with keygen: replace an existing key")
    k.add_argument("--config")
    k.set_defaults(fn=cmd_dkim)

    r = sub.add_parser("route", help="assess and route a message without sending it",
                       description="Assess and route a message exactly as the server would, and print the pool"
                                   " and reasons; nothing is sent. DNS questions go to the configured resolver"
                                   " (live DNS unless [dns] nameservers says otherwise).")
    r.add_argument("message", nargs="?", help="message file (RFC 5322), or - for stdin")
    r.add_argument("--mail-from", help="envelope sender (\"\" for the null reverse-path)")
    r.add_argument("--rcpt", action="append", default=[], help="envelope recipient (repeatable)")
    r.add_argument("--client-ip", help="client IP the message came from (matches connectors)")
    r.add_argument("--auth-user", help="SMTP AUTH user it was submitted as")
    r.add_argument("--config")
    r.add_argument("--json", action="store_true")
    r.add_argument("--rules", action="store_true", help="print the routing rule table")
    r.set_defaults(fn=cmd_route)

    t = sub.add_parser("trace", help="show the event timeline of messages")
    t.add_argument("queue_id", nargs="?")
    t.add_argument("--message-id")
    t.add_argument("--sender")
    t.add_argument("--recipient")
    t.add_argument("--limit", type=int, default=20)
    t.add_argument("--json", action="store_true")
    t.add_argument("--config")
    t.set_defaults(fn=cmd_trace)

    q = sub.add_parser("queue", help="list, show, retry or delete queued messages (like postqueue)")
    q.add_argument("action", choices=["list", "show", "retry", "delete"])
    q.add_argument("queue_id", nargs="?")
    q.add_argument("--all", action="store_true", help="with retry: every deferred message")
    q.add_argument("--limit", type=int, default=1000, help="with list: at most this many messages")
    q.add_argument("--json", action="store_true")
    q.add_argument("--config")
    q.set_defaults(fn=cmd_queue)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills optional positionals greedily: in `queue show --config F ID` the
    # id comes after an option. Take one such trailing id; refuse anything else.
    if extra and len(extra) == 1 and not extra[0].startswith("-") and getattr(args, "queue_id", "x") is None:
        args.queue_id, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args) or 0
    except BrokenPipeError:                   # `poolmta trace … | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
