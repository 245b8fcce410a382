"""A token bucket: how many messages a connection may send, and how fast."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

# A token that is one rounding error short is still a token: a client sending
# at exactly the allowed rate must not be cut off by float arithmetic.
_ONE = 1.0 - 1e-9


class TokenBucket:
    """
    ``rate`` tokens per second flow into a bucket that holds ``burst``.

    Each message takes one token; a message that finds the bucket empty is
    over the limit.  A chat user typing in bursts never notices; a script
    that floods does, within ``burst`` messages.  Time comes from ``clock``
    so tests can drive it with ``twisted.internet.task.Clock``.
    """

    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, clock: IReactorTime) -> None:
        self._rate = rate
        self._burst = float(max(burst, 1))
        self._clock = clock
        self._tokens = self._burst
        self._stamp = clock.seconds()

    def take(self) -> bool:
        """Spend one token; return ``False`` if there was none to spend."""
        now = self._clock.seconds()
        tokens = self._tokens + (now - self._stamp) * self._rate
        self._stamp = now
        if tokens > self._burst:
            tokens = self._burst
        if tokens < _ONE:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True
