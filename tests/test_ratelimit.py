"""Token buckets, driven by an explicit clock (no sleeping, no timing assertions)."""

from __future__ import annotations

import pytest

from gateway.ratelimit import KeyedBuckets, TokenBucket, retry_after


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2, burst=4, now=0.0)
    assert [bucket.take(now=0.0) for _ in range(5)] == [True, True, True, True, False]
    assert bucket.wait(now=0.0) == pytest.approx(0.5)
    assert bucket.take(now=0.5) and not bucket.take(now=0.5)
    assert [bucket.take(now=10.0) for _ in range(5)] == [True, True, True, True, False]


def test_an_empty_bucket_refuses_until_its_next_token_then_gives_exactly_one() -> None:
    """While empty, ``take`` answers from the time its next token is due (one comparison,
    for a flood's refusals); the tokens given over time are the same as without it."""
    bucket = TokenBucket(rate=4, burst=1, now=0.0)
    assert bucket.take(now=0.0) and not bucket.take(now=0.0)
    assert [bucket.take(now=t / 100) for t in range(1, 25)] == [False] * 24
    assert bucket.take(now=0.25)
    assert not bucket.take(now=0.26)
    given = sum(bucket.take(now=0.25 + t / 1000) for t in range(1, 2001))
    assert given == 8  # two seconds at four a second


def test_the_burst_defaults_to_the_rate() -> None:
    bucket = TokenBucket(rate=3, now=0.0)
    assert sum(bucket.take(now=0.0) for _ in range(10)) == 3


def test_rate_zero_is_unlimited() -> None:
    bucket = TokenBucket(rate=0)
    assert all(bucket.take() for _ in range(1000))


def test_keyed_buckets_are_independent_and_bounded() -> None:
    buckets = KeyedBuckets(rate=1, burst=1, max_keys=2)
    assert buckets.take("a", now=0.0) == 0.0
    assert buckets.take("a", now=0.0) == pytest.approx(1.0)
    assert buckets.take("b", now=0.0) == 0.0
    assert buckets.take("c", now=0.0) == 0.0  # forgets "a", the least recently used
    assert buckets.take("a", now=0.0) == 0.0  # a fresh bucket: at worst one more burst
    assert buckets.take("a", now=0.25) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (4.999, "5"), (30.0, "30")]
)
def test_retry_after_is_whole_seconds_rounded_up(seconds: float, header: str) -> None:
    assert retry_after(seconds) == header
