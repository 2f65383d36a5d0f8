"""spool.schedule: retry delays, the repeating last delay, and expiry at the queue lifetime."""

import pytest

from poolmta.clock import FakeClock
from poolmta.spool.schedule import Expire, Retry, after_deferral, deadline, expired, retry_delay

SCHEDULE = (300.0, 900.0, 3600.0)


@pytest.mark.parametrize("attempts, delay", [
    (0, 300.0),        # deferred before any attempt (source-domain recheck): the first delay
    (1, 300.0),        # after the first try: retry 1
    (2, 900.0),
    (3, 3600.0),
    (4, 3600.0),       # the last value repeats
    (50, 3600.0),
])
def test_retry_delay_walks_the_schedule_then_repeats_the_last(attempts, delay):
    assert retry_delay(attempts, SCHEDULE) == delay


def test_single_value_schedule_repeats():
    assert [retry_delay(n, [1.0]) for n in range(1, 5)] == [1.0, 1.0, 1.0, 1.0]


def test_empty_schedule_is_an_error():
    with pytest.raises(ValueError):
        retry_delay(1, ())


def test_deadline_and_expired():
    assert deadline(1000.0, 50.0) == 1050.0
    assert not expired(1050.0, 1000.0, 50.0)
    assert expired(1050.5, 1000.0, 50.0)


def test_deferral_plans_the_retry_from_now():
    clock = FakeClock()
    received = clock.now()
    clock.advance(10)
    plan = after_deferral(now=clock.now(), received_at=received, attempts=1, schedule=SCHEDULE, lifetime=86400)
    assert plan == Retry(clock.now() + 300.0)
    clock.advance(300)
    plan = after_deferral(now=clock.now(), received_at=received, attempts=2, schedule=SCHEDULE, lifetime=86400)
    assert plan == Retry(clock.now() + 900.0)


def test_expires_when_the_next_retry_would_fall_past_the_lifetime():
    clock = FakeClock()
    received = clock.now()
    lifetime = 4000.0
    # Walk the schedule: 300, 900, 3600 ... the retry after t=1200 would be at 4800 > 4000.
    plans = []
    attempts = 0
    while True:
        attempts += 1
        plan = after_deferral(now=clock.now(), received_at=received, attempts=attempts, schedule=SCHEDULE,
                              lifetime=lifetime)
        plans.append(plan)
        if isinstance(plan, Expire):
            break
        clock.advance(plan.at - clock.now())
    assert [type(p).__name__ for p in plans] == ["Retry", "Retry", "Expire"]
    assert plans[-1] == Expire(received + lifetime)
    assert clock.now() == received + 1200.0


def test_a_retry_exactly_at_the_deadline_is_still_made():
    plan = after_deferral(now=1000.0, received_at=1000.0, attempts=1, schedule=[60.0], lifetime=60.0)
    assert plan == Retry(1060.0)


def test_a_message_already_past_its_lifetime_expires_on_its_first_deferral():
    # e.g. the gateway was down for a week: one try, then give up.
    plan = after_deferral(now=10_000.0, received_at=0.0, attempts=1, schedule=SCHEDULE, lifetime=5000.0)
    assert plan == Expire(5000.0)
