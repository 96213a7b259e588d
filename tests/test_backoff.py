"""``backoff_delay``: capped exponential backoff with bounded jitter."""

from __future__ import annotations

import random

import pytest

from kraite_mp.backoff import backoff_delay


@pytest.mark.unit
def test_backoff_sequence_is_capped_exponential() -> None:
    delays = [backoff_delay(a, jitter_ratio=0) for a in range(8)]
    assert delays == [1, 2, 4, 8, 16, 32, 32, 32]


@pytest.mark.unit
def test_backoff_jitter_bounded_and_varies() -> None:
    rng = random.Random(1)
    samples = [backoff_delay(3, jitter_ratio=0.1, rng=rng) for _ in range(200)]
    assert all(8 <= s <= 8.8 for s in samples)
    assert len(set(samples)) > 100
    with pytest.raises(ValueError):
        backoff_delay(-1)
