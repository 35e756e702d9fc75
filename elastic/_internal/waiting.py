"""The one bounded wait: poll a condition until it holds or a deadline passes.

The clock and the sleep are parameters, so that code built on it (the supervisor's loops) runs in
unit tests without real time passing. Every wait in elastic has a bound; this is how it is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], *, timeout_s: float, interval_s: float = 0.05,
               backoff: float = 1.0, max_interval_s: float | None = None,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], object] = time.sleep) -> T | None:
    """cond()'s first truthy value, checked every `interval_s`; None once `timeout_s` passed.

    backoff > 1 grows the interval by that factor after each check, up to `max_interval_s` (keeps a
    shared service such as the rendezvous store quiet while many ranks wait on it).

    cond() runs at least once, and once more at the deadline, so a condition that became true
    during the last sleep is not missed. `sleep` may be an Event's wait (it is called with the
    seconds to wait; a truthy return means "stop now": the wait ends with one last check).
    """
    if not (timeout_s >= 0 and interval_s > 0 and backoff >= 1):
        raise ValueError(f"wait_until needs timeout_s >= 0, interval_s > 0, backoff >= 1 "
                         f"(got {timeout_s}, {interval_s}, {backoff})")
    deadline = clock() + timeout_s
    cap = max_interval_s if max_interval_s is not None else interval_s
    while True:
        got = cond()
        if got:
            return got
        left = deadline - clock()
        if left <= 0:
            return None
        if sleep(min(interval_s, left)):
            got = cond()
            return got if got else None
        interval_s = min(interval_s * backoff, max(cap, interval_s))
