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
from kraite_mp.config import load as config_load
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
    assert config_load.KNOWN_DISPATCH_KEYS is KNOWN_DISPATCH_KEYS
    assert config.UserDataStreamSettings().events == list(USER_DATA_EVENTS)
    assert KNOWN_EVENTS == set(USER_DATA_EVENTS) and len(USER_DATA_EVENTS) == len(KNOWN_EVENTS)
    assert set(config.DEFAULT_DISPATCHED_EXECUTIONS) <= KNOWN_DISPATCH_KEYS
    assert len(KNOWN_DISPATCH_KEYS) == 15


# -- REST snapshots of positions and balances ---------------------------------------------------------

ACCOUNT_REST_2026 = Path(__file__).resolve().parent / "fixtures" / "account_rest_2026.json"


def account_rest_2026() -> dict[str, Any]:
    with open(ACCOUNT_REST_2026) as f:
        data: dict[str, Any] = json.load(f)
    return data


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def test_position_risk_replies_parse_with_their_side_margin_type_and_event_time() -> None:
    data = account_rest_2026()
    parsed = user.positions_from_rest([c["reply"] for c in data["position_risk"]], data["asked_at_ms"])
    assert len(parsed) == len(data["position_risk"])
    for case, (position, time_ms) in zip(data["position_risk"], parsed, strict=True):
        want = case["expect"]
        assert position == Position(
            symbol=want["symbol"],
            position_side=want["side"],
            amount=_dec(want["amount"]),
            entry_price=_dec(want["entry"]),
            breakeven_price=_dec(want["breakeven"]),
            unrealized_pnl=_dec(want["upnl"]),
            margin_type=want["margin_type"],
            isolated_wallet=_dec(want["isolated_wallet"]),
        ), case["note"]
        assert time_ms == want["time"], case["note"]


def test_balance_replies_parse_without_a_balance_change() -> None:
    data = account_rest_2026()
    parsed = user.balances_from_rest([c["reply"] for c in data["balance"]], data["asked_at_ms"])
    for case, (balance, time_ms) in zip(data["balance"], parsed, strict=True):
        want = case["expect"]
        assert balance == Balance(want["asset"], Decimal(want["wallet"]), Decimal(want["cross"]), None)
        assert time_ms == want["time"]
    assert user.balances_from_rest([], 5) == [] and user.positions_from_rest([], 5) == []


@pytest.mark.parametrize("case", account_rest_2026()["broken"], ids=lambda c: str(c["note"]))
def test_a_broken_snapshot_item_refuses_the_whole_snapshot(case: dict[str, Any]) -> None:
    data = account_rest_2026()
    items = [c["reply"] for c in data[case["kind"]]]
    items[-1] = {k: v for k, v in {**items[-1], **case["patch"]}.items() if v is not None}
    parse = user.positions_from_rest if case["kind"] == "position_risk" else user.balances_from_rest
    with pytest.raises(FrameError, match=re.escape(case["error"])):
        parse(items, data["asked_at_ms"])
    with pytest.raises(FrameError, match="not a list"):
        parse({"code": -1, "msg": "x"}, 1)
    with pytest.raises(FrameError, match=r"\[0\]: not an object"):
        parse(["x"], 1)


@pytest.mark.parametrize(
    "parser", [user.positions_from_rest, user.balances_from_rest], ids=lambda p: p.__name__
)
def test_each_snapshot_parser_docstring_sample_is_real_and_parses(parser: Any) -> None:
    doc = parser.__doc__ or ""
    payload = json.loads(doc.split("::", 1)[1])
    parsed = parser(payload, 7)
    assert len(parsed) == 1 and parsed[0][1] == max(7, payload[0]["updateTime"])


def test_a_combined_stream_frame_is_the_event_it_carries_without_its_listen_key() -> None:
    inner = json.loads(sample("Binance doc ACCOUNT_UPDATE sample"))
    wrapped = json.dumps({"stream": "k" * 64, "data": inner})
    event = parse_frame(3, wrapped)
    assert event.kind == "event" and event.event_type == "ACCOUNT_UPDATE" and event.account is not None
    assert event.error is None and "k" * 64 not in (event.payload_text or "")
    assert json.loads(event.payload_text or "") == inner
    # anything else shaped like an envelope is left as it is
    assert parse_frame(3, json.dumps({"stream": "x", "data": [1]})).kind == "not_object"
    assert parse_frame(3, json.dumps({"stream": "x", "data": {"e": "X"}, "more": 1})).kind == "not_object"


SIM_FRAMES_2026 = Path(__file__).resolve().parent / "fixtures" / "sim_frames_2026.jsonl"


def test_recorded_simulator_frames_of_every_2026_kind_parse_unwrapped_and_scrubbed() -> None:
    """Frames recorded from the simulator on /private/stream (two keys, wrapped): every kind the exchange
    sends in 2026. ``outcome`` is what ``store.dispatch.decide`` made of each with every dispatch key on."""
    with open(SIM_FRAMES_2026) as f:
        recorded = [json.loads(line) for line in f if line.strip()]
    assert len(recorded) >= 25
    kinds = set()
    for r in recorded:
        event = parse_frame(1, r["frame"])
        assert event.kind == "event" and event.known and event.error is None, r["note"]
        assert (event.event_type, event.dispatch_key) == (r["event_type"], r["dispatch_key"]), r["note"]
        assert "FakeListenKeyForTheFixtures" not in (event.payload_text or ""), r["note"]
        if r["outcome"] == "dispatched":
            assert event.order is not None, r["note"]
        elif r["outcome"] == "applied":
            assert event.account is not None and event.account.balances, r["note"]
        kinds.add((event.event_type, event.dispatch_key))
        if event.order is not None and event.order.status == "EXPIRED_IN_MATCH":
            kinds.add(("status", "EXPIRED_IN_MATCH"))
        if event.account is not None:
            kinds |= {("side", p.position_side) for p in event.account.positions}
            kinds |= {("margin", p.margin_type) for p in event.account.positions}
    assert {
        ("ORDER_TRADE_UPDATE", "AMENDMENT"),
        ("ORDER_TRADE_UPDATE", "CALCULATED"),
        ("status", "EXPIRED_IN_MATCH"),
        ("ALGO_UPDATE", "ALGO_TRIGGERING"),
        ("side", "LONG"),
        ("side", "SHORT"),
        ("margin", "isolated"),
        ("MARGIN_CALL", None),
        ("ACCOUNT_CONFIG_UPDATE", None),
        ("STRATEGY_UPDATE", None),
        ("GRID_UPDATE", None),
        ("CONDITIONAL_ORDER_TRIGGER_REJECT", None),
        ("listenKeyExpired", None),
    } <= kinds


def test_check_events_refuses_a_list_that_silences_the_stream_and_warns_about_trade_lite() -> None:
    errors, warnings = user.check_events(list(USER_DATA_EVENTS))
    assert errors == [] and len(warnings) == 1 and "TRADE_LITE" in warnings[0]
    lean = ["ORDER_TRADE_UPDATE", "ACCOUNT_UPDATE", "ALGO_UPDATE", "listenKeyExpired"]
    assert user.check_events(lean) == ([], [])
    errors, _ = user.check_events(["ORDER_TRADE_UPDATE", "ACCOUNT_UPDATE"])
    assert [e.split()[0] for e in errors] == ["listenKeyExpired", "ALGO_UPDATE"]
    errors, warnings = user.check_events([*lean[:1], "order_trade_update", *lean[2:], "listenKeyExpired"])
    assert any("order_trade_update" in e for e in errors) and any("twice" in e for e in errors)
    assert any("ACCOUNT_UPDATE" in w for w in warnings)
    assert set(user.REQUIRED_EVENTS) <= KNOWN_EVENTS
