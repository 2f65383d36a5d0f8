

def test_event_log_writes_whole_lines_in_pipe_sized_writes():
    import select

    from poolmta.trace.recorder import EventLog

    class Stream:
        def __init__(self):
            self.buffer = self
            self.writes: list[bytes] = []

        def write(self, data):
            self.writes.append(data)

        def flush(self):
            pass
    s = Stream()
    log = EventLog(s)
    for i in range(40):                                # no event loop: each line at once
        log.add(1796377293.5 + i, b'{"n":%d,"pad":"%s"}' % (i, b"x" * 300))
    assert len(s.writes) == 40
    log._pending = []
    # Gathered lines (one event-loop turn) go out in writes of whole lines, none over PIPE_BUF.
    for i in range(40):
        log._pending.append(b'%d %s\n' % (i, b"y" * 300))
    log.flush()
    assert all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in s.writes[40:])
    assert b"".join(s.writes[40:]).count(b"\n") == 40 and len(s.writes) > 41
    assert s.writes[0].startswith(b"2026-") and b" poolmta.trace INFO {\"n\":0," in s.writes[0]
