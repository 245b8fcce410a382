"""The token bucket, on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from webchat.ratelimit import TokenBucket


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_refusal(self):
        bucket = TokenBucket(rate=2, burst=3, clock=Clock())
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])

    def test_refills_at_rate_and_never_above_burst(self):
        clock = Clock()
        bucket = TokenBucket(rate=2, burst=3, clock=clock)
        for _ in range(3):
            bucket.take()
        self.assertFalse(bucket.take())
        clock.advance(0.5)  # one token
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        clock.advance(100)  # capped at burst
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])

    def test_steady_rate_is_sustainable(self):
        clock = Clock()
        bucket = TokenBucket(rate=20, burst=1, clock=clock)
        results = []
        for _ in range(100):
            results.append(bucket.take())
            clock.advance(0.05)
        self.assertTrue(all(results))

    def test_refused_attempts_do_not_earn_credit(self):
        clock = Clock()
        bucket = TokenBucket(rate=1, burst=1, clock=clock)
        self.assertTrue(bucket.take())
        for _ in range(10):
            clock.advance(0.09)
            self.assertFalse(bucket.take())
        clock.advance(0.1)
        self.assertTrue(bucket.take())

    def test_take_many_tokens_at_once(self):
        # The byte budget: one read of N bytes takes N tokens.
        clock = Clock()
        bucket = TokenBucket(rate=100, burst=1000, clock=clock)
        self.assertTrue(bucket.take(600))
        self.assertFalse(bucket.take(600))
        clock.advance(2)
        self.assertTrue(bucket.take(600))
