"""The user-data edge: frames parse once into typed results; scrubbing; the lists config imports."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kraite_mp import config
from kraite_mp.binance import fields, orders, user
from kraite_mp.binance.fields import FrameError
from kraite_mp.binance.user import (
    KNOWN_DISPATCH_KEYS,
    KNOWN_EVENTS,
    MAX_FRAME_CHARS,
    USER_DATA_EVENTS,
    AccountUpdate,
    Balance,
    FrameKind,
    Position,
    account_update_from_ws,
    is_listen_key_expired,
    parse_frame,
    scrub_text,
)
from kraite_mp.logs import register_secret

pytestmark = pytest.mark.unit

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "binance_samples.jsonl"


def samples() -> list[dict[str, Any]]:
    with open(SAMPLES) as f:
        return [json.loads(line) for line in f if line.strip()]


def sample(note_prefix: str) -> str:
    return next(s["frame"] for s in samples() if s["note"].startswith(note_prefix))


# -- envelope and scrubbing (moved from test_userdata_units.py) -------------------------------------


def test_parse_frame_kinds() -> None:
    assert parse_frame(1, '{"e":"ORDER_TRADE_UPDATE","E":1,"o":{}}').known
    unknown = parse_frame(1, '{"e":"NEW_THING","E":"17"}')
    assert unknown.kind == "event" and not unknown.known and unknown.event_time_ms == 17
    assert parse_frame(1, "{oops").kind == "malformed"
    assert parse_frame(1, "[]").kind == "not_object"
    assert parse_frame(1, '{"E":1}').kind == "not_object"
    over = parse_frame(1, '{"e":"X","p":"' + "z" * MAX_FRAME_CHARS + '"}')
    assert over.kind == "oversized" and over.raw_text is not None and len(over.raw_text) <= 8192


def test_parse_keeps_exact_text_unless_scrubbing() -> None:
    text = '{"e":"ACCOUNT_UPDATE","E":1,"x":1.10000000000000000001}'
    assert parse_frame(1, text).payload_text == text  # numbers never pass through float
    expired = parse_frame(1, '{"e":"listenKeyExpired","E":"1","listenKey":"abcdefghijklmnop"}')
    assert expired.payload_text is not None and "abcdefghijklmnop" not in expired.payload_text
    assert json.loads(expired.payload_text)["listenKey"] == "***"
    nested = parse_frame(1, '{"e":"X","E":1,"d":[{"listenKey":"qqqqqqqqqqqqqqqq"}]}')
    assert nested.payload_text is not None and "qqqqqqqqqqqqqqqq" not in nested.payload_text


def test_scrub_text_removes_keys_and_registered_secrets() -> None:
    register_secret("SECRETSECRET123456")
    text = '{"e":"listenKeyExpired","listenKey":"K1K1K1K1K1K1"} SECRETSECRET123456 K2K2K2K2K2K2'
    out = scrub_text(text, ("K2K2K2K2K2K2",))
    assert "K1K1K1K1K1K1" not in out and "K2K2K2K2K2K2" not in out and "SECRETSECRET123456" not in out
    assert is_listen_key_expired('{"e": "listenKeyExpired", "E": "1"}')
    assert not is_listen_key_expired('{"e":"ORDER_TRADE_UPDATE","note":"listenKeyExpired"}')


# -- typed bodies -------------------------------------------------------------------------------------


def test_order_frame_parses_once_into_an_order_state() -> None:
    event = parse_frame(7, sample("partial fill"))
    assert event.kind is FrameKind.EVENT and event.error is None and event.account is None
    assert event.dispatch_key == "TRADE" and event.event_time_ms == 1568879480001
    order = event.order
    assert order is not None and (order.account_id, order.kind, order.exchange_order_id) == (
        7,
        "regular",
        8886775,
    )
    assert order.filled_quantity == Decimal("0.250") and order.average_price == Decimal("2500.10")
    assert order.trade_id == 123456 and order.source == "ws"
    algo = parse_frame(7, sample("Binance doc ALGO_UPDATE")).order
    assert algo is not None and algo.kind == "algo" and algo.exchange_order_id == 2148719
    assert algo.execution_type == "ALGO_CANCELED" and algo.actual_order_id is None


def test_account_update_parses_into_balances_and_positions() -> None:
    event = parse_frame(3, sample("Binance doc ACCOUNT_UPDATE"))
    assert event.order is None and event.error is None
    assert event.account == AccountUpdate(
        account_id=3,
        event_time_ms=1564745798939,
        balances=(
            Balance("USDT", Decimal("122624.12345678"), Decimal("100.12345678"), Decimal("50.12345678")),
            Balance("BUSD", Decimal("1.00000000"), Decimal("0.00000000"), Decimal("-49.12345678")),
        ),
        positions=(
            Position(
                "BTCUSDT",
                "BOTH",
                Decimal("0"),
                Decimal("0.00000"),
                Decimal("0"),
                Decimal("0"),
                "isolated",
                Decimal("0.00000000"),
            ),
            Position(
                "BTCUSDT",
                "LONG",
                Decimal("20"),
                Decimal("6563.66500"),
                Decimal("6563.6"),
                Decimal("2850.21200"),
                "isolated",
                Decimal("13200.70726908"),
            ),
        ),
    )
    no_side = account_update_from_ws(3, {"E": 5, "a": {"P": [{"s": "ETHUSDT", "pa": "1", "mt": 7}]}})
    assert no_side.positions[0].position_side == "BOTH" and no_side.positions[0].margin_type is None
    assert no_side.balances == ()


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (
            '{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"BTCUSDT","x":"TRADE","X":"FILLED","z":"1"}}',
            "o.i: missing",
        ),
        (
            '{"e":"ORDER_TRADE_UPDATE","E":1,"T":1,"o":{"s":"B","x":"TRADE","X":"FILLED","i":1,"z":1.5}}',
            "o.z: float value, expected a decimal string",
        ),
        ('{"e":"ORDER_TRADE_UPDATE","E":1,"o":"string"}', "o: missing order object"),
        ('{"e":"ALGO_UPDATE","o":{"aid":1,"s":"B","X":"NEW"}}', "T: missing transaction time"),
        ('{"e":"ACCOUNT_UPDATE","E":1,"a":{"B":[{"a":"USDT","wb":"x"}]}}', "a.B[0].wb: not a decimal: 'x'"),
        ('{"e":"ACCOUNT_UPDATE","a":{"B":[]}}', "E: missing event time"),
        ('{"e":"ACCOUNT_UPDATE","E":1,"a":{"B":5}}', "a.B: not a list"),
        ('{"e":"ACCOUNT_UPDATE","E":1,"a":{"P":["x"]}}', "a.P[0]: not an object"),
    ],
)
def test_a_broken_body_is_an_event_with_an_error_never_an_exception(frame: str, error: str) -> None:
    event = parse_frame(1, frame)
    assert event.kind is FrameKind.EVENT and event.known
    assert event.order is None and event.account is None and event.error == error
    assert event.payload_text == frame  # still audited as it came


def test_every_recorded_sample_parses_without_raising() -> None:
    for s in samples():
        event = parse_frame(1, s["frame"])
        assert event.kind in set(FrameKind), s["note"]
        if s["outcome"] in ("dispatched", "applied"):
            assert (event.order or event.account) is not None and event.error is None, s["note"]


def test_decimal_rules() -> None:
    with pytest.raises(FrameError, match="not finite"):
        account_update_from_ws(1, {"E": 1, "a": {"B": [{"a": "USDT", "wb": "NaN"}]}})
    assert user.dispatch_key({"e": "ALGO_UPDATE", "o": {"X": "FINISHED", "aq": "junk"}}) == "ALGO_FINISHED"


def test_received_at_accepts_epoch_ms_and_iso_text() -> None:
    assert fields.received_at(1_700_000_000_000) == datetime.fromtimestamp(1_700_000_000, tz=UTC)
    assert fields.received_at("2026-01-02T03:04:05") == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    before = datetime.now(tz=UTC)
    assert fields.received_at("yesterday") >= before and fields.received_at(True) >= before


_PARSERS = [
    orders.order_from_ws,
    orders.algo_from_ws,
    user.account_update_from_ws,
    orders.order_from_rest,
    orders.algo_from_rest,
]


@pytest.mark.parametrize("parser", _PARSERS, ids=lambda p: p.__name__)
def test_each_parser_docstring_sample_is_real_and_parses(parser: Any) -> None:
    """The sample in each docstring (cryptofeed style) is valid JSON once its // comments go, and parses."""
    doc = parser.__doc__ or ""
    text = doc.split("::", 1)[1]
    payload = json.loads(re.sub(r"//[^\n]*", "", text))
    parsed = parser(42, payload)
    assert parsed.account_id == 42


# -- one home for the lists ---------------------------------------------------------------------------


def test_config_imports_the_lists_instead_of_repeating_them() -> None:
    assert config.KNOWN_DISPATCH_KEYS is KNOWN_DISPATCH_KEYS
    assert config.UserDataStreamSettings().events == list(USER_DATA_EVENTS)
    assert KNOWN_EVENTS == set(USER_DATA_EVENTS) and len(USER_DATA_EVENTS) == len(KNOWN_EVENTS)
    assert set(config.DEFAULT_DISPATCHED_EXECUTIONS) <= KNOWN_DISPATCH_KEYS
    assert len(KNOWN_DISPATCH_KEYS) == 15
