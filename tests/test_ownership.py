"""Shards: which accounts this host owns (``supervisor.shard``)."""

from __future__ import annotations

import pytest

from kraite_mp.config.load import parse_shard
from kraite_mp.supervisor.ownership import ModuloShard


@pytest.mark.unit
def test_shard_ownership() -> None:
    assert parse_shard("all") is None
    assert parse_shard("1/4") == (1, 4)
    shard = ModuloShard(1, 4)

    class A:
        def __init__(self, i: int) -> None:
            self.id = i

    assert [i for i in range(10) if shard.owns(A(i))] == [1, 5, 9]  # type: ignore[arg-type]
