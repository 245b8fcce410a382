"""A token bucket: how many messages, frames or bytes a connection may send."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

# A token that is one rounding error short is still a token: a client sending
# at exactly the allowed rate must not be cut off by float arithmetic.
_SLACK = 1e-9


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

    def take(self, amount: float = 1.0) -> bool:
        """
        Spend ``amount`` tokens (one message, one frame, N bytes); return
        ``False`` if there were not that many to spend.
        """
        now = self._clock.seconds()
        tokens = self._tokens + (now - self._stamp) * self._rate
        self._stamp = now
        if tokens > self._burst:
            tokens = self._burst
        if tokens < amount - _SLACK:
            self._tokens = tokens
            return False
        self._tokens = tokens - amount
        return True
