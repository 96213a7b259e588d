"""Exchange state of the simulator: accounts, listenKeys, orders, algo orders and the scenario.

Everything here is guarded by one re-entrant lock, so the public methods may be called from any
thread. State changes produce user-data events; they are handed, still under the lock, to the
``sink`` callback (the stream hub), which keeps their order per account. Whether anybody is
connected does not matter here: state changes anyway and ``truth()`` always reflects it.

Quantities and prices are ``Decimal``; JSON leaves as decimal strings. Times are integer ms.
"""

from __future__ import annotations

import hashlib
import logging
import random
import string
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, TypeVar

from kraite_mp.simulator.market import KNOWN_SYMBOLS, Market, MarketSymbol, split_symbol

log = logging.getLogger(__name__)

#: Validity of a listenKey after its creation or last keepalive (production: 60 minutes).
DEFAULT_LISTEN_KEY_TTL_S = 3600.0
#: The scenario never keeps more regular orders open per account than this.
DEFAULT_MAX_OPEN_ORDERS = 20
#: ... nor more algo orders open per account than this.
DEFAULT_MAX_OPEN_ALGOS = 10
#: Terminal orders kept per account; older ones become unqueryable (-2013), as on Binance.
DEFAULT_MAX_KEPT_ORDERS = 100_000
#: Starting USDT wallet balance of every account.
START_WALLET = Decimal("10000.00000000")
#: Assets ``GET /fapi/v3/balance`` lists besides USDT (the scenario never moves them: always zero).
OTHER_ASSETS: tuple[str, ...] = ("USDC", "BNB")
#: Leverage of a symbol nobody set one for (ACCOUNT_CONFIG_UPDATE changes it).
DEFAULT_LEVERAGE = 20
#: Maintenance margin rate of the positionRisk answers (one flat tier: enough for a stand-in).
MAINT_MARGIN_RATE = Decimal("0.004")

#: Commission rate of a taker fill (Binance USD-M regular tier).
TAKER_FEE = Decimal("0.0005")
#: Commission rate of a maker fill.
MAKER_FEE = Decimal("0.0002")
#: Quantum of the 8-decimal amounts Binance reports (average prices, balances).
_EIGHT_DP = Decimal("0.00000001")
#: Decimal zero, for comparisons and sums.
_ZERO = Decimal(0)

#: Symbols the scenario trades on (always USD-M, always known, independent of the market walk).
SCENARIO_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT", "DOGEUSDT")
#: One LIMIT order per scenario symbol, far from the market (symbol, quantity, price): it rests open, so a
#: test or benchmark that places them makes every symbol the scenario trades active in the database (a
#: reconnect's sweep then looks at its history).
RESTING_ORDERS: tuple[tuple[str, str, str], ...] = (
    ("BTCUSDT", "0.010", "43000.10"),
    ("ETHUSDT", "0.100", "1600.51"),
    ("SOLUSDT", "1", "71.3100"),
    ("BNBUSDT", "0.10", "305.230"),
    ("XRPUSDT", "10.0", "1.0517"),
    ("DOGEUSDT", "100", "0.085615"),
)

#: Regular order statuses that ``GET /fapi/v1/openOrders`` lists (independent of the product's copy).
OPEN_STATUSES = frozenset({"NEW", "PARTIALLY_FILLED"})
#: Algo statuses that ``GET /fapi/v1/openAlgoOrders`` lists.
OPEN_ALGO_STATUSES = frozenset({"NEW", "TRIGGERING"})
#: Algo statuses whose order is still in play (kept when old terminal algos are pruned).
_LIVE_ALGO = frozenset({"NEW", "TRIGGERING", "TRIGGERED"})
#: Conditional order types, served by the algo service (ALGO_UPDATE), not as regular orders.
ALGO_ORDER_TYPES = frozenset(
    {"STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"}
)
#: Alphabet of generated API keys, secrets, listen keys and client order ids.
_ALPHANUM = string.ascii_letters + string.digits

#: (event type, serialized JSON) pairs for one account, in delivery order.
EventBatch = list[tuple[str, dict[str, Any]]]
#: sink(api_key, events, expired_listen_key): called with the engine lock held.
EventSink = Callable[[str, EventBatch, "str | None"], None]


class SimulatorError(ValueError):
    """A control call that does not fit the state (unknown key, order, wrong status...)."""


class ApiError(Exception):
    """An error answered to a REST client as ``{"code": code, "msg": msg}`` with ``status``."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(f"{status} {code} {msg}")
        self.status = status
        self.code = code
        self.msg = msg


def invalid_api_key() -> ApiError:
    return ApiError(401, -2015, "Invalid API-key, IP, or permissions for action.")


def unknown_listen_key() -> ApiError:
    return ApiError(400, -1125, "This listenKey does not exist.")


def unknown_order() -> ApiError:
    return ApiError(400, -2013, "Order does not exist.")


@dataclass(frozen=True, slots=True)
class SimAccount:
    """Credentials of one simulated account."""

    api_key: str
    api_secret: str


def fmt_avg(cum_quote: Decimal, qty: Decimal) -> str:
    """Average fill price: cumQuote / executedQty, rounded half-even to 8 decimals ("0.00000000" if none)."""
    if qty == 0:
        return "0.00000000"
    return f"{(cum_quote / qty).quantize(_EIGHT_DP, rounding=ROUND_HALF_EVEN):.8f}"


def _zero_like(qty: Decimal) -> Decimal:
    """Zero with the scale of ``qty`` ("0.000" for "0.010"), as Binance writes executedQty."""
    exponent = qty.as_tuple().exponent
    return Decimal(0).quantize(qty) if isinstance(exponent, int) and exponent < 0 else Decimal(0)


_T = TypeVar("_T")


def _lookup(
    by_id: Mapping[int, _T], by_client_id: Mapping[str, int], id_: int | None, client_id: str | None
) -> _T | None:
    """An order or algo order as REST finds it: by id, else by client id (None: unknown)."""
    if id_ is None and client_id is not None:
        id_ = by_client_id.get(client_id)
    return by_id.get(id_) if id_ is not None else None


def _index_open(open_by_id: dict[int, _T], key: int, item: _T, is_open: bool) -> None:
    """Keep an index of the open orders (or algo orders) in step with a status change."""
    if is_open:
        open_by_id[key] = item
    else:
        open_by_id.pop(key, None)


def fmt8(value: Decimal) -> str:
    return f"{value.quantize(_EIGHT_DP, rounding=ROUND_HALF_EVEN):.8f}"


@dataclass
class Order:
    """A regular (matching-engine) order; ``to_rest()`` is the GET /fapi/v1/order shape."""

    order_id: int
    client_order_id: str
    symbol: str
    side: str
    type: str
    orig_type: str
    time_in_force: str
    price: Decimal
    orig_qty: Decimal
    stop_price: Decimal
    time: int
    update_time: int
    executed_qty: Decimal = _ZERO
    cum_quote: Decimal = _ZERO
    status: str = "NEW"
    reduce_only: bool = False
    close_position: bool = False
    position_side: str = "BOTH"
    working_type: str = "CONTRACT_PRICE"
    price_protect: bool = False
    price_match: str = "NONE"
    stp_mode: str = "EXPIRE_MAKER"
    good_till_date: int = 0
    algo_id: int | None = None
    activation_price: Decimal | None = None  #: TRAILING_STOP_MARKET only (``AP``, ``activatePrice``)
    callback_rate: Decimal | None = None  #: TRAILING_STOP_MARKET only (``cr``, ``priceRate``)

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def remaining(self) -> Decimal:
        return self.orig_qty - self.executed_qty

    def to_rest(self) -> dict[str, Any]:
        return {
            "orderId": self.order_id,
            "symbol": self.symbol,
            "status": self.status,
            "clientOrderId": self.client_order_id,
            "price": str(self.price),
            "avgPrice": fmt_avg(self.cum_quote, self.executed_qty),
            "origQty": str(self.orig_qty),
            "executedQty": str(self.executed_qty),
            "cumQuote": str(self.cum_quote),
            "timeInForce": self.time_in_force,
            "type": self.type,
            "reduceOnly": self.reduce_only,
            "closePosition": self.close_position,
            "side": self.side,
            "positionSide": self.position_side,
            "stopPrice": str(self.stop_price),
            "workingType": self.working_type,
            "priceProtect": self.price_protect,
            "origType": self.orig_type,
            "priceMatch": self.price_match,
            "selfTradePreventionMode": self.stp_mode,
            "goodTillDate": self.good_till_date,
            "time": self.time,
            "updateTime": self.update_time,
            **(
                {"activatePrice": str(self.activation_price), "priceRate": str(self.callback_rate)}
                if self.activation_price is not None and self.callback_rate is not None
                else {}
            ),
        }


@dataclass
class AlgoOrder:
    """A conditional order of the algo service; ``to_rest()`` is the GET /fapi/v1/algoOrder shape."""

    algo_id: int
    client_algo_id: str
    order_type: str
    symbol: str
    side: str
    quantity: Decimal
    trigger_price: Decimal
    price: Decimal
    create_time: int
    update_time: int
    status: str = "NEW"
    algo_type: str = "CONDITIONAL"
    position_side: str = "BOTH"
    time_in_force: str = "GTC"
    actual_order_id: int | None = None
    executed_qty: Decimal = _ZERO
    cum_quote: Decimal = _ZERO
    stp_mode: str = "EXPIRE_MAKER"
    working_type: str = "CONTRACT_PRICE"
    price_match: str = "NONE"
    close_position: bool = False
    price_protect: bool = False
    reduce_only: bool = False
    trigger_time: int = 0
    good_till_date: int = 0
    reason: str = ""
    activation_price: Decimal | None = None  #: TRAILING_STOP_MARKET only
    callback_rate: Decimal | None = None  #: TRAILING_STOP_MARKET only

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_ALGO_STATUSES

    def to_rest(self) -> dict[str, Any]:
        """The schema since 2026-06-09: ``actualType``/``actualQty`` only once triggered, no ``tp*``/``sl*``."""
        row: dict[str, Any] = {
            "algoId": self.algo_id,
            "clientAlgoId": self.client_algo_id,
            "algoType": self.algo_type,
            "orderType": self.order_type,
            "symbol": self.symbol,
            "side": self.side,
            "positionSide": self.position_side,
            "timeInForce": self.time_in_force,
            "quantity": str(self.quantity),
            "algoStatus": self.status,
            "triggerPrice": str(self.trigger_price),
            "price": str(self.price),
            "icebergQuantity": None,
            "selfTradePreventionMode": self.stp_mode,
            "workingType": self.working_type,
            "priceMatch": self.price_match,
            "closePosition": self.close_position,
            "priceProtect": self.price_protect,
            "reduceOnly": self.reduce_only,
            "createTime": self.create_time,
            "updateTime": self.update_time,
            "triggerTime": self.trigger_time,
            "goodTillDate": self.good_till_date,
            "actualOrderId": "" if self.actual_order_id is None else str(self.actual_order_id),
            "actualPrice": fmt_avg(self.cum_quote, self.executed_qty),
        }
        if self.actual_order_id is not None:
            row["actualType"] = "MARKET" if self.order_type.endswith("MARKET") else "LIMIT"
            row["actualQty"] = str(self.executed_qty or _zero_like(self.quantity))
        return row

    def to_event(self) -> dict[str, Any]:
        return {
            "caid": self.client_algo_id,
            "aid": self.algo_id,
            "at": self.algo_type,
            "o": self.order_type,
            "s": self.symbol,
            "S": self.side,
            "ps": self.position_side,
            "f": self.time_in_force,
            "q": str(self.quantity),
            "X": self.status,
            "ai": "" if self.actual_order_id is None else str(self.actual_order_id),
            "ap": fmt_avg(self.cum_quote, self.executed_qty),
            "aq": str(self.executed_qty),
            "act": "0",
            "tp": str(self.trigger_price),
            "p": str(self.price),
            "V": self.stp_mode,
            "wt": self.working_type,
            "pm": self.price_match,
            "cp": self.close_position,
            "pP": self.price_protect,
            "R": self.reduce_only,
            "tt": self.trigger_time,
            "gtd": self.good_till_date,
            "rm": self.reason,
            "ia": False,
        }


def _check_side(side: str) -> None:
    if side not in ("BUY", "SELL"):
        raise SimulatorError(f"bad side {side!r}")


def _rest_rows(items: Iterable[Order | AlgoOrder], symbol: str | None) -> list[dict[str, Any]]:
    """The REST shape of ``items``, of one symbol only unless ``symbol`` is None."""
    return [o.to_rest() for o in items if symbol is None or o.symbol == symbol]


@dataclass
class Position:
    symbol: str
    position_side: str = "BOTH"  #: BOTH in one-way mode, LONG or SHORT in hedge mode
    amount: Decimal = _ZERO
    entry_price: Decimal = _ZERO
    realized: Decimal = _ZERO
    update_time: int = 0  #: the last fill that changed it (positionRisk ``updateTime``)
    isolated: bool = False  #: margin type ISOLATED (else CROSSED)
    isolated_wallet: Decimal = _ZERO  #: the margin held by an isolated position (entry notional / leverage)

    def unrealized(self, mark: Decimal) -> Decimal:
        return (mark - self.entry_price) * self.amount if self.amount else _ZERO

    def to_rest(
        self, mark: Decimal, leverage: int, margin_asset: str, bids: Decimal, asks: Decimal
    ) -> dict[str, Any]:
        """One item of ``GET /fapi/v3/positionRisk``."""
        notional = self.amount * mark
        initial = abs(notional) / leverage
        open_initial = (bids + asks) / leverage
        isolated_margin = self.isolated_wallet + self.unrealized(mark) if self.isolated else _ZERO
        return {
            "symbol": self.symbol,
            "positionSide": self.position_side,
            "positionAmt": str(self.amount),
            "entryPrice": fmt8(self.entry_price),
            "breakEvenPrice": fmt8(self.entry_price),
            "markPrice": fmt8(mark),
            "unRealizedProfit": fmt8(self.unrealized(mark)),
            "liquidationPrice": "0",
            "isolatedMargin": fmt8(isolated_margin),
            "notional": fmt8(notional),
            "marginAsset": margin_asset,
            "isolatedWallet": fmt8(self.isolated_wallet),
            "initialMargin": fmt8(initial + open_initial),
            "maintMargin": fmt8(abs(notional) * MAINT_MARGIN_RATE),
            "positionInitialMargin": fmt8(initial),
            "openOrderInitialMargin": fmt8(open_initial),
            "adl": 1 if self.amount else 0,
            "bidNotional": fmt8(bids),
            "askNotional": fmt8(asks),
            "updateTime": self.update_time,
        }

    def to_event(self, mark: Decimal) -> dict[str, Any]:
        return {
            "s": self.symbol,
            "pa": str(self.amount),
            "ep": fmt8(self.entry_price),
            "bep": fmt8(self.entry_price),
            "cr": fmt8(self.realized),
            "up": fmt8(self.unrealized(mark)),
            "mt": "isolated" if self.isolated else "cross",
            "iw": fmt8(self.isolated_wallet),
            "ps": self.position_side,
        }


@dataclass
class _Account:
    index: int
    creds: SimAccount
    rng: random.Random
    next_order_id: int
    next_algo_id: int
    next_trade_id: int
    valid: bool = True
    listen_key: str | None = None
    listen_key_deadline: float = 0.0
    last_ms: int = 0
    seq: int = 0
    wallet: Decimal = START_WALLET
    wallet_update_time: int = 0  #: the last fill that changed the wallet (balance ``updateTime``)
    orders: dict[int, Order] = field(default_factory=dict)
    open_orders: dict[int, Order] = field(default_factory=dict)  #: index of the NEW/PARTIALLY_FILLED ones
    orders_by_client_id: dict[str, int] = field(default_factory=dict)
    algos: dict[int, AlgoOrder] = field(default_factory=dict)
    open_algos: dict[int, AlgoOrder] = field(default_factory=dict)  #: index of the NEW/TRIGGERING ones
    algos_by_client_id: dict[str, int] = field(default_factory=dict)
    positions: dict[tuple[str, str], Position] = field(default_factory=dict)  #: by (symbol, side)
    dual_side: bool = False  #: hedge mode: positions LONG and SHORT per symbol
    isolated_symbols: set[str] = field(default_factory=set)  #: margin type ISOLATED
    multi_assets: bool = False
    prices: dict[str, Decimal] = field(default_factory=dict)
    leverage: dict[str, int] = field(default_factory=dict)
    steps: int = 0


def _credentials(seed: int, index: int) -> SimAccount:
    digest = hashlib.sha256(f"kraite-mp-sim:{seed}:{index}".encode()).digest()
    rng = random.Random(digest)
    key = "".join(rng.choice(_ALPHANUM) for _ in range(64))
    secret = "".join(rng.choice(_ALPHANUM) for _ in range(64))
    return SimAccount(key, secret)


class Engine:
    """The exchange state. All public methods are thread-safe."""

    def __init__(
        self,
        accounts: int,
        market: Market,
        seed: int,
        listen_key_ttl_s: float = DEFAULT_LISTEN_KEY_TTL_S,
        max_open_orders: int = DEFAULT_MAX_OPEN_ORDERS,
        max_open_algos: int = DEFAULT_MAX_OPEN_ALGOS,
        max_kept_orders: int = DEFAULT_MAX_KEPT_ORDERS,
    ) -> None:
        self.lock = threading.RLock()  #: guards all the state below; every public method holds it
        self.market = market
        self.seed = seed  #: every random stream (accounts, listen keys, symbols) derives from it
        self.listen_key_ttl_s = listen_key_ttl_s  #: a listenKey expires this long after its last keepalive
        self.max_open_orders = max_open_orders  #: the scenario keeps at most this many orders open
        self.max_open_algos = max_open_algos  #: ... and this many algo orders, per account
        self.max_kept_orders = max_kept_orders  #: terminal orders kept per account (older ones: -2013)
        self.clock_offset_ms = 0  #: added to the server time (clock-skew tests)
        #: ``E`` of listenKeyExpired as a string (Binance's docs example) or an int (the SDK's schema).
        self.expired_e_as_string = True
        self._sink: EventSink | None = None
        self._key_rng = random.Random(f"{seed}:listenkeys")
        self._accounts: dict[str, _Account] = {}
        self._listen_keys: dict[str, str] = {}
        self._symbol_info: dict[str, MarketSymbol] = {}
        for i in range(accounts):
            creds = _credentials(seed, i)
            self._accounts[creds.api_key] = _Account(
                index=i,
                creds=creds,
                rng=random.Random(f"{seed}:account:{i}"),
                next_order_id=8_000_000_000 + i * 100_000_000,
                next_algo_id=3_000_000_000 + i * 100_000_000,
                next_trade_id=5_000_000_000 + i * 100_000_000,
            )

    # ------------------------------------------------------------------ plumbing
    def set_sink(self, sink: EventSink | None) -> None:
        with self.lock:
            self._sink = sink

    @property
    def accounts(self) -> list[SimAccount]:
        return [a.creds for a in self._accounts.values()]

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.clock_offset_ms

    def _acct(self, api_key: str) -> _Account:
        acct = self._accounts.get(api_key)
        if acct is None:
            raise SimulatorError(f"unknown api_key {api_key[:8]}...")
        return acct

    def _tick(self, acct: _Account) -> int:
        """A strictly increasing ms timestamp per account (never behind the wall clock)."""
        ts = max(self.now_ms(), acct.last_ms + 1)
        acct.last_ms = ts
        return ts

    def _emit(self, acct: _Account, events: EventBatch, expired_key: str | None = None) -> None:
        if events and self._sink is not None:
            self._sink(acct.creds.api_key, events, expired_key)

    def _info(self, symbol: str) -> MarketSymbol:
        info = self._symbol_info.get(symbol)
        if info is None:
            info = self.market.get(symbol)
            if info is None:
                from kraite_mp.simulator.market import make_symbol

                info = make_symbol(symbol, random.Random(f"{self.seed}:symbol:{symbol}"))
            self._symbol_info[symbol] = info
        return info

    def _price(self, acct: _Account, symbol: str) -> Decimal:
        """The account-local last price of a symbol (its own walk keeps scenarios deterministic)."""
        price = acct.prices.get(symbol)
        if price is None:
            info = self._info(symbol)
            known = {name: p for name, p, _ in KNOWN_SYMBOLS}
            price = Decimal(known[symbol]) if symbol in known else info.mark
            acct.prices[symbol] = price
        return price

    # ------------------------------------------------------------------ credentials
    def secret_for(self, api_key: str) -> str:
        """The API secret of a valid key; ApiError -2015 otherwise."""
        with self.lock:
            acct = self._accounts.get(api_key)
            if acct is None or not acct.valid:
                raise invalid_api_key()
            return acct.creds.api_secret

    def set_api_key_valid(self, api_key: str, valid: bool) -> None:
        with self.lock:
            self._acct(api_key).valid = valid

    # ------------------------------------------------------------------ listenKeys
    def listen_key_create(self, api_key: str) -> str:
        with self.lock:
            self.secret_for(api_key)
            acct = self._accounts[api_key]
            if acct.listen_key is None:
                key = "".join(self._key_rng.choice(_ALPHANUM) for _ in range(64))
                acct.listen_key = key
                self._listen_keys[key] = api_key
            acct.listen_key_deadline = time.monotonic() + self.listen_key_ttl_s
            return acct.listen_key

    def listen_key_keepalive(self, api_key: str, listen_key: str | None = None) -> str:
        with self.lock:
            self.secret_for(api_key)
            acct = self._accounts[api_key]
            if acct.listen_key is None or (listen_key and listen_key != acct.listen_key):
                raise unknown_listen_key()
            acct.listen_key_deadline = time.monotonic() + self.listen_key_ttl_s
            return acct.listen_key

    def listen_key_delete(self, api_key: str, listen_key: str | None = None) -> str | None:
        """Invalidate the account's key: listenKeyExpired goes to its connections (as on Binance), and the
        key is returned so the hub can close them after it."""
        with self.lock:
            self.secret_for(api_key)
            acct = self._accounts[api_key]
            key = acct.listen_key
            if key is None or (listen_key and listen_key != key):
                raise unknown_listen_key()
            self._kill_listen_key(acct)
            return key

    def account_for_listen_key(self, listen_key: str) -> str | None:
        with self.lock:
            return self._listen_keys.get(listen_key)

    def is_active_listen_key(self, listen_key: str) -> bool:
        with self.lock:
            return listen_key in self._listen_keys

    def expire_listen_key(self, api_key: str) -> str | None:
        """Kill the account's key now: listenKeyExpired goes out, then the key is unknown."""
        with self.lock:
            acct = self._acct(api_key)
            if acct.listen_key is None:
                return None
            key = self._kill_listen_key(acct)
            log.info("account=%d listenKey expired", acct.index)
            return key

    def set_listen_key_expired_e(self, as_string: bool = True) -> None:
        """``E`` of listenKeyExpired from now on: a string (the docs' example) or an int (the SDK)."""
        with self.lock:
            self.expired_e_as_string = bool(as_string)

    def _kill_listen_key(self, acct: _Account) -> str:
        key = acct.listen_key
        assert key is not None
        acct.listen_key = None
        self._listen_keys.pop(key, None)
        event_ms = self._tick(acct)
        # Binance's docs show E as a string in this event, the SDK's schema an int (docs/PROTOCOL.md)
        e_value: int | str = str(event_ms) if self.expired_e_as_string else event_ms
        self._emit(
            acct, [("listenKeyExpired", {"e": "listenKeyExpired", "E": e_value, "listenKey": key})], key
        )
        return key

    def expire_due_listen_keys(self) -> None:
        now = time.monotonic()
        with self.lock:
            for acct in self._accounts.values():
                if acct.listen_key is not None and acct.listen_key_deadline <= now:
                    self.expire_listen_key(acct.creds.api_key)

    # ------------------------------------------------------------------ queries (REST + truth)
    def get_order(
        self, api_key: str, symbol: str, order_id: int | None, client_order_id: str | None
    ) -> dict[str, Any]:
        with self.lock:
            acct = self._accounts[api_key]
            order = _lookup(acct.orders, acct.orders_by_client_id, order_id, client_order_id)
            if order is None or order.symbol != symbol:
                raise unknown_order()
            if client_order_id is not None and order.client_order_id != client_order_id:
                raise unknown_order()
            return order.to_rest()

    def open_orders(self, api_key: str, symbol: str | None) -> list[dict[str, Any]]:
        with self.lock:
            return _rest_rows(self._accounts[api_key].open_orders.values(), symbol)

    def all_orders(
        self,
        api_key: str,
        symbol: str,
        order_id: int | None,
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        with self.lock:
            acct = self._accounts[api_key]
            found = [
                o
                for o in acct.orders.values()
                if o.symbol == symbol
                and (order_id is None or o.order_id >= order_id)
                and (start_ms is None or o.time >= start_ms)
                and (end_ms is None or o.time <= end_ms)
            ]
            found.sort(key=lambda o: o.order_id)
            found = found[:limit] if order_id is not None else found[-limit:]
            return [o.to_rest() for o in found]

    def all_algos(
        self,
        api_key: str,
        symbol: str,
        algo_id: int | None,
        start_ms: int,
        end_ms: int | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """GET /fapi/v1/allAlgoOrders: a symbol's algo orders created in [start_ms, end_ms] (None: no
        end), by algoId (the first ``limit`` from ``algo_id`` on, else the newest ``limit``)."""
        with self.lock:
            acct = self._accounts[api_key]
            found = [
                a
                for a in acct.algos.values()
                if a.symbol == symbol
                and (algo_id is None or a.algo_id >= algo_id)
                and start_ms <= a.create_time
                and (end_ms is None or a.create_time <= end_ms)
            ]
            found.sort(key=lambda a: a.algo_id)
            found = found[:limit] if algo_id is not None else found[-limit:]
            return [a.to_rest() for a in found]

    def get_algo(self, api_key: str, algo_id: int | None, client_algo_id: str | None) -> dict[str, Any]:
        with self.lock:
            acct = self._accounts[api_key]
            algo = _lookup(acct.algos, acct.algos_by_client_id, algo_id, client_algo_id)
            if algo is None:
                raise unknown_order()
            return algo.to_rest()

    def open_algos(self, api_key: str, symbol: str | None) -> list[dict[str, Any]]:
        with self.lock:
            return _rest_rows(self._accounts[api_key].open_algos.values(), symbol)

    def position_risk(self, api_key: str, symbol: str | None) -> list[dict[str, Any]]:
        """GET /fapi/v3/positionRisk: without ``symbol`` only the symbols holding a position or an open
        order (a closed position is absent); with one, that symbol's item even when it is flat."""
        with self.lock:
            acct = self._accounts[api_key]
            if symbol is not None:
                symbols = {symbol}
            else:
                symbols = {p.symbol for p in acct.positions.values() if p.amount != 0}
                symbols |= {o.symbol for o in acct.open_orders.values()}
            sides = ("LONG", "SHORT") if acct.dual_side else ("BOTH",)
            rows = []
            for sym, side in ((sym, side) for sym in sorted(symbols) for side in sides):
                position = acct.positions.get((sym, side)) or Position(
                    sym, side, isolated=sym in acct.isolated_symbols
                )
                mine = [o for o in acct.open_orders.values() if o.symbol == sym and o.position_side == side]
                bids = sum((o.remaining * o.price for o in mine if o.side == "BUY"), _ZERO)
                asks = sum((o.remaining * o.price for o in mine if o.side == "SELL"), _ZERO)
                leverage = acct.leverage.get(sym, DEFAULT_LEVERAGE)
                rows.append(
                    position.to_rest(
                        self._price(acct, sym), leverage, self._info(sym).quote_asset, bids, asks
                    )
                )
            return rows

    def balances(self, api_key: str) -> list[dict[str, Any]]:
        """GET /fapi/v3/balance: USDT (the wallet every fill moves) and the other assets, at zero."""
        with self.lock:
            acct = self._accounts[api_key]
            alias = hashlib.sha256(acct.creds.api_key.encode()).hexdigest()[:8]
            upnl = sum(
                (
                    p.unrealized(self._price(acct, p.symbol))
                    for p in acct.positions.values()
                    if p.amount and not p.isolated
                ),
                _ZERO,
            )
            available = self._cross_wallet(acct) + upnl
            rows = [
                {
                    "accountAlias": alias,
                    "asset": "USDT",
                    "balance": fmt8(acct.wallet),
                    "crossWalletBalance": fmt8(self._cross_wallet(acct)),
                    "crossUnPnl": fmt8(upnl),
                    "availableBalance": fmt8(available),
                    "maxWithdrawAmount": fmt8(max(available, _ZERO)),
                    "marginAvailable": True,
                    "updateTime": acct.wallet_update_time,
                }
            ]
            zero = fmt8(_ZERO)
            for asset in OTHER_ASSETS:
                rows.append(
                    {
                        "accountAlias": alias,
                        "asset": asset,
                        "balance": zero,
                        "crossWalletBalance": zero,
                        "crossUnPnl": zero,
                        "availableBalance": zero,
                        "maxWithdrawAmount": zero,
                        "marginAvailable": True,
                        "updateTime": 0,
                    }
                )
            return rows

    def account_info(self, api_key: str) -> dict[str, Any]:
        """GET /fapi/v3/account: totals, the assets (as ``balances``) and the positions (as positionRisk,
        only those holding a position or an open order), in that endpoint's fields."""
        with self.lock:
            balances = self.balances(api_key)
            risks = self.position_risk(api_key, None)
            by_asset = {b["asset"]: b for b in balances}
            usdt = by_asset["USDT"]
            position_im = sum((Decimal(r["positionInitialMargin"]) for r in risks), _ZERO)
            order_im = sum((Decimal(r["openOrderInitialMargin"]) for r in risks), _ZERO)
            maint = sum((Decimal(r["maintMargin"]) for r in risks), _ZERO)
            upnl = sum((Decimal(r["unRealizedProfit"]) for r in risks), _ZERO)
            wallet = Decimal(usdt["balance"])
            assets = []
            for b in balances:
                mine = b is usdt
                assets.append(
                    {
                        "asset": b["asset"],
                        "walletBalance": b["balance"],
                        "unrealizedProfit": fmt8(upnl) if mine else b["crossUnPnl"],
                        "marginBalance": fmt8(wallet + upnl) if mine else b["balance"],
                        "maintMargin": fmt8(maint if mine else _ZERO),
                        "initialMargin": fmt8(position_im + order_im if mine else _ZERO),
                        "positionInitialMargin": fmt8(position_im if mine else _ZERO),
                        "openOrderInitialMargin": fmt8(order_im if mine else _ZERO),
                        "crossWalletBalance": b["crossWalletBalance"],
                        "crossUnPnl": b["crossUnPnl"],
                        "availableBalance": b["availableBalance"],
                        "maxWithdrawAmount": b["maxWithdrawAmount"],
                        "updateTime": b["updateTime"],
                    }
                )
            positions = [
                {
                    "symbol": r["symbol"],
                    "positionSide": r["positionSide"],
                    "positionAmt": r["positionAmt"],
                    "unrealizedProfit": r["unRealizedProfit"],
                    "isolatedMargin": r["isolatedMargin"],
                    "notional": r["notional"],
                    "isolatedWallet": r["isolatedWallet"],
                    "initialMargin": r["initialMargin"],
                    "maintMargin": r["maintMargin"],
                    "updateTime": r["updateTime"],
                }
                for r in risks
            ]
            return {
                "totalInitialMargin": fmt8(position_im + order_im),
                "totalMaintMargin": fmt8(maint),
                "totalWalletBalance": usdt["balance"],
                "totalUnrealizedProfit": fmt8(upnl),
                "totalMarginBalance": fmt8(wallet + upnl),
                "totalPositionInitialMargin": fmt8(position_im),
                "totalOpenOrderInitialMargin": fmt8(order_im),
                "totalCrossWalletBalance": usdt["crossWalletBalance"],
                "totalCrossUnPnl": usdt["crossUnPnl"],
                "availableBalance": usdt["availableBalance"],
                "maxWithdrawAmount": usdt["maxWithdrawAmount"],
                "assets": assets,
                "positions": positions,
            }

    @staticmethod
    def _cross_wallet(acct: _Account) -> Decimal:
        """The wallet less what isolated positions hold."""
        return acct.wallet - sum((p.isolated_wallet for p in acct.positions.values()), _ZERO)

    def truth(self, api_key: str) -> dict[str, Any]:
        with self.lock:
            acct = self._acct(api_key)
            return {
                "orders": [o.to_rest() for o in acct.orders.values()],
                "algo_orders": [a.to_rest() for a in acct.algos.values()],
                "positions": [
                    p.to_event(self._price(acct, p.symbol)) for p in acct.positions.values() if p.amount != 0
                ],
                "wallet_balance": fmt8(acct.wallet),
                "listen_key": acct.listen_key,
                "steps": acct.steps,
            }

    # ------------------------------------------------------------------ event builders
    def _order_event(
        self,
        acct: _Account,
        order: Order,
        execution: str,
        ts: int,
        last_qty: Decimal = _ZERO,
        last_price: Decimal = _ZERO,
        trade_id: int = 0,
        commission: Decimal = _ZERO,
        maker: bool = False,
        realized: Decimal = _ZERO,
        modify_id: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        bids = sum(
            (
                o.remaining * o.price
                for o in acct.open_orders.values()
                if o.symbol == order.symbol and o.side == "BUY"
            ),
            _ZERO,
        )
        asks = sum(
            (
                o.remaining * o.price
                for o in acct.open_orders.values()
                if o.symbol == order.symbol and o.side == "SELL"
            ),
            _ZERO,
        )
        info = self._info(order.symbol)
        body = {
            "s": order.symbol,
            "c": order.client_order_id,
            "S": order.side,
            "o": order.type,
            "f": order.time_in_force,
            "q": str(order.orig_qty),
            "p": str(order.price),
            "ap": fmt_avg(order.cum_quote, order.executed_qty),
            "sp": str(order.stop_price),
            "x": execution,
            "X": order.status,
            "i": order.order_id,
            "l": str(last_qty),
            "z": str(order.executed_qty),
            "L": str(last_price),
            "N": info.quote_asset,
            "n": fmt8(commission),
            "T": ts,
            "t": trade_id,
            "b": str(bids),
            "a": str(asks),
            "m": maker,
            "R": order.reduce_only,
            "wt": order.working_type,
            "ot": order.orig_type,
            "ps": order.position_side,
            "cp": order.close_position,
            "rp": fmt8(realized),
            "pP": order.price_protect,
            "si": 0,
            "ss": 0,
            "V": order.stp_mode,
            "pm": order.price_match,
            "gtd": order.good_till_date,
            "er": "0",
        }
        if order.activation_price is not None and order.callback_rate is not None:
            body["AP"], body["cr"] = str(order.activation_price), str(order.callback_rate)
        if modify_id is not None:  # only on an AMENDMENT that carried one (2026-07)
            body["M"] = modify_id
        return "ORDER_TRADE_UPDATE", {"e": "ORDER_TRADE_UPDATE", "E": self._tick(acct), "T": ts, "o": body}

    def _algo_event(self, acct: _Account, algo: AlgoOrder) -> tuple[str, dict[str, Any]]:
        ts = self._tick(acct)
        algo.update_time = ts
        return "ALGO_UPDATE", {"e": "ALGO_UPDATE", "T": ts, "E": self._tick(acct), "o": algo.to_event()}

    # ------------------------------------------------------------------ orders
    def _new_client_id(self, acct: _Account, prefix: str = "") -> str:
        return prefix + "".join(acct.rng.choice(_ALPHANUM) for _ in range(22 - len(prefix)))

    def place_order(
        self,
        api_key: str,
        symbol: str = "BTCUSDT",
        side: str = "BUY",
        type: str = "LIMIT",  # or MARKET
        quantity: str = "0.010",
        price: str = "86000.10",  # the LIMIT price
        client_order_id: str | None = None,  # None: a generated one
        time_in_force: str | None = None,  # None: GTC
        reduce_only: bool = False,
        position_side: str | None = None,  # hedge mode: LONG or SHORT (one-way mode: BOTH, the default)
    ) -> int:
        """Place a regular order (NEW event). MARKET orders fill at once, as on the exchange (and
        ignore ``price``)."""
        _check_side(side)
        if type not in ("LIMIT", "MARKET"):
            raise SimulatorError(f"regular orders are LIMIT or MARKET, not {type!r} (use place_algo)")
        qty = Decimal(quantity)
        if qty <= 0:
            raise SimulatorError("quantity must be positive")
        limit_price = Decimal(price) if type == "LIMIT" else Decimal(0)
        if type == "LIMIT" and limit_price <= 0:
            raise SimulatorError("LIMIT orders need a positive price")
        with self.lock:
            acct = self._acct(api_key)
            ps = position_side or ("" if acct.dual_side else "BOTH")
            if (ps in ("LONG", "SHORT")) != acct.dual_side or ps not in ("LONG", "SHORT", "BOTH"):
                mode = "hedge mode needs LONG or SHORT" if acct.dual_side else "one-way mode takes BOTH"
                raise SimulatorError(f"position_side {position_side!r}: {mode} (-4061)")
            order = self._create_order(
                acct, symbol, side, type, type, qty, limit_price, client_order_id, time_in_force, reduce_only
            )
            order.position_side = ps
            events: EventBatch = [self._order_event(acct, order, "NEW", order.time)]
            if type == "MARKET":
                events += self._fill_events(
                    acct, order, order.remaining, self._price(acct, symbol), maker=False
                )
            self._emit(acct, events)
            return order.order_id

    def _create_order(
        self,
        acct: _Account,
        symbol: str,
        side: str,
        type: str,
        orig_type: str,
        qty: Decimal,
        price: Decimal,
        client_order_id: str | None,
        time_in_force: str | None,
        reduce_only: bool,
        stop_price: Decimal = _ZERO,
        algo_id: int | None = None,
    ) -> Order:
        if client_order_id is None:
            client_order_id = self._new_client_id(acct)
        existing = acct.orders_by_client_id.get(client_order_id)
        if existing is not None and acct.orders[existing].is_open:
            raise SimulatorError(f"duplicate open clientOrderId {client_order_id!r}")
        ts = self._tick(acct)
        acct.next_order_id += 1
        order = Order(
            order_id=acct.next_order_id,
            client_order_id=client_order_id,
            symbol=symbol,
            side=side,
            type=type,
            orig_type=orig_type,
            time_in_force=time_in_force or "GTC",
            price=price,
            orig_qty=qty,
            stop_price=stop_price,
            time=ts,
            update_time=ts,
            executed_qty=_zero_like(qty),
            reduce_only=reduce_only,
            algo_id=algo_id,
        )
        acct.orders[order.order_id] = order
        acct.open_orders[order.order_id] = order
        acct.orders_by_client_id[client_order_id] = order.order_id
        self._prune(acct)
        return order

    @staticmethod
    def _set_status(acct: _Account, order: Order, status: str) -> None:
        order.status = status
        _index_open(acct.open_orders, order.order_id, order, order.is_open)

    @staticmethod
    def _set_algo_status(acct: _Account, algo: AlgoOrder, status: str) -> None:
        algo.status = status
        _index_open(acct.open_algos, algo.algo_id, algo, algo.is_open)

    def _prune(self, acct: _Account) -> None:
        """Forget the oldest terminal orders and algo orders beyond the cap (in batches of 10%)."""
        cap = self.max_kept_orders
        if len(acct.orders) > cap + cap // 10:
            for oid in [oid for oid, o in acct.orders.items() if not o.is_open][: len(acct.orders) - cap]:
                order = acct.orders.pop(oid)
                if acct.orders_by_client_id.get(order.client_order_id) == oid:
                    del acct.orders_by_client_id[order.client_order_id]
        if len(acct.algos) > cap + cap // 10:
            for aid in [aid for aid, a in acct.algos.items() if a.status not in _LIVE_ALGO][
                : len(acct.algos) - cap
            ]:
                algo = acct.algos.pop(aid)
                if acct.algos_by_client_id.get(algo.client_algo_id) == aid:
                    del acct.algos_by_client_id[algo.client_algo_id]

    def _open_order(self, acct: _Account, order_id: int) -> Order:
        order = acct.orders.get(order_id)
        if order is None:
            raise SimulatorError(f"unknown order {order_id}")
        if not order.is_open:
            raise SimulatorError(f"order {order_id} is {order.status}")
        return order

    def _fill_events(
        self,
        acct: _Account,
        order: Order,
        qty: Decimal,
        price: Decimal,
        maker: bool,
        execution: str = "TRADE",
    ) -> EventBatch:
        """One fill: TRADE_LITE, ORDER_TRADE_UPDATE x=TRADE, ACCOUNT_UPDATE (+ ALGO_UPDATE FINISHED).
        A liquidation (``execution`` CALCULATED) has no TRADE_LITE."""
        if qty <= 0 or qty > order.remaining:
            raise SimulatorError(f"fill qty {qty} outside (0, {order.remaining}]")
        ts = self._tick(acct)
        acct.next_trade_id += 1
        trade_id = acct.next_trade_id
        order.executed_qty += qty
        order.cum_quote += qty * price
        self._set_status(
            acct, order, "FILLED" if order.executed_qty == order.orig_qty else "PARTIALLY_FILLED"
        )
        order.update_time = ts
        algo = acct.algos.get(order.algo_id) if order.algo_id is not None else None
        if algo is not None and algo.actual_order_id == order.order_id:  # its actualQty/actualPrice
            algo.executed_qty, algo.cum_quote, algo.update_time = order.executed_qty, order.cum_quote, ts
        commission = (qty * price * (MAKER_FEE if maker else TAKER_FEE)).quantize(_EIGHT_DP)
        key = (order.symbol, order.position_side)
        realized = self._apply_position(acct, key, qty if order.side == "BUY" else -qty, price)
        acct.wallet += realized - commission
        acct.positions[key].update_time = acct.wallet_update_time = ts
        events: EventBatch = [
            (
                "TRADE_LITE",
                {
                    "e": "TRADE_LITE",
                    "E": self._tick(acct),
                    "T": ts,
                    "s": order.symbol,
                    "q": str(order.orig_qty),
                    "p": str(order.price),
                    "m": maker,
                    "c": order.client_order_id,
                    "S": order.side,
                    "L": str(price),
                    "l": str(qty),
                    "t": trade_id,
                    "i": order.order_id,
                },
            ),
            self._order_event(acct, order, execution, ts, qty, price, trade_id, commission, maker, realized),
        ]
        if execution != "TRADE":
            del events[0]
        position = acct.positions[key]
        info = self._info(order.symbol)
        events.append(
            (
                "ACCOUNT_UPDATE",
                {
                    "e": "ACCOUNT_UPDATE",
                    "E": self._tick(acct),
                    "T": ts,
                    "a": {
                        "m": "ORDER",
                        "B": [
                            {
                                "a": info.quote_asset,
                                "wb": fmt8(acct.wallet),
                                "cw": fmt8(self._cross_wallet(acct)),
                                "bc": "0",
                            }
                        ],
                        "P": [position.to_event(price)],
                    },
                },
            )
        )
        if not order.is_open:
            events += self._finish_algo_of(acct, order)
        return events

    def _apply_position(
        self, acct: _Account, key: tuple[str, str], delta: Decimal, price: Decimal
    ) -> Decimal:
        """Update the (symbol, side) position; return the realized PnL of the closing part."""
        symbol = key[0]
        pos = acct.positions.get(key)
        if pos is None:
            pos = acct.positions[key] = Position(symbol, key[1], isolated=symbol in acct.isolated_symbols)
        realized = _ZERO
        if pos.amount == 0 or (pos.amount > 0) == (delta > 0):
            total = pos.amount + delta
            pos.entry_price = (
                (pos.entry_price * abs(pos.amount) + price * abs(delta)) / abs(total)
            ).quantize(_EIGHT_DP)
            pos.amount = total
        else:
            closing = min(abs(delta), abs(pos.amount))
            realized = (price - pos.entry_price) * closing * (1 if pos.amount > 0 else -1)
            realized = realized.quantize(_EIGHT_DP)
            pos.realized += realized
            pos.amount += delta
            if pos.amount == 0:
                pos.entry_price = _ZERO
            elif (pos.amount > 0) == (delta > 0):  # flipped: the rest opens at the fill price
                pos.entry_price = price
        if pos.isolated:
            leverage = acct.leverage.get(symbol, DEFAULT_LEVERAGE)
            pos.isolated_wallet = (abs(pos.amount) * pos.entry_price / leverage).quantize(_EIGHT_DP)
        acct.prices[symbol] = price
        return realized

    def _finish_algo_of(self, acct: _Account, order: Order) -> EventBatch:
        if order.algo_id is None:
            return []
        algo = acct.algos.get(order.algo_id)
        if algo is None or algo.status != "TRIGGERED":
            return []
        self._set_algo_status(acct, algo, "FINISHED")
        algo.executed_qty = order.executed_qty
        algo.cum_quote = order.cum_quote
        return [self._algo_event(acct, algo)]

    def fill(self, api_key: str, order_id: int, qty: str | None = None, price: str | None = None) -> None:
        """Fill part (``qty``) or all of the rest of an open order, at its limit price by default."""
        with self.lock:
            acct = self._acct(api_key)
            order = self._open_order(acct, order_id)
            fill_qty = order.remaining if qty is None else Decimal(qty)
            if price is not None:
                fill_price = Decimal(price)
            elif order.type == "LIMIT":
                fill_price = order.price
            else:
                fill_price = self._price(acct, order.symbol)
            self._emit(
                acct, self._fill_events(acct, order, fill_qty, fill_price, maker=order.type == "LIMIT")
            )

    def _end_order(self, api_key: str, order_id: int, status: str, execution: str | None = None) -> None:
        with self.lock:
            acct = self._acct(api_key)
            order = self._open_order(acct, order_id)
            ts = self._tick(acct)
            self._set_status(acct, order, status)
            order.update_time = ts
            events = [self._order_event(acct, order, execution or status, ts)]
            events += self._finish_algo_of(acct, order)
            self._emit(acct, events)

    def cancel(self, api_key: str, order_id: int) -> None:
        self._end_order(api_key, order_id, "CANCELED")

    def expire(self, api_key: str, order_id: int) -> None:
        self._end_order(api_key, order_id, "EXPIRED")

    def expire_in_match(self, api_key: str, order_id: int) -> None:
        """Self-trade prevention expired the order while matching: x=EXPIRED, X=EXPIRED_IN_MATCH."""
        self._end_order(api_key, order_id, "EXPIRED_IN_MATCH", "EXPIRED")

    def amend(
        self,
        api_key: str,
        order_id: int,
        price: str | None = None,
        quantity: str | None = None,
        modify_id: str | None = None,
    ) -> None:
        """Modify price and/or quantity of an open LIMIT order (x=AMENDMENT; ``o.M`` = ``modify_id`` when
        given, a string, as since 2026-07)."""
        with self.lock:
            acct = self._acct(api_key)
            order = self._open_order(acct, order_id)
            if order.type != "LIMIT":
                raise SimulatorError("only LIMIT orders can be amended")
            if quantity is not None:
                new_qty = Decimal(quantity)
                if new_qty <= order.executed_qty:
                    raise SimulatorError("amended quantity must exceed the executed quantity")
                order.orig_qty = new_qty
            if price is not None:
                new_price = Decimal(price)
                if new_price <= 0:
                    raise SimulatorError("amended price must be positive")
                order.price = new_price
            ts = self._tick(acct)
            order.update_time = ts
            self._emit(acct, [self._order_event(acct, order, "AMENDMENT", ts, modify_id=modify_id)])

    # ------------------------------------------------------------------ algo orders
    def place_algo(
        self,
        api_key: str,
        symbol: str = "BTCUSDT",
        side: str = "SELL",
        type: str = "STOP_MARKET",  # one of ALGO_ORDER_TYPES
        quantity: str = "0.010",
        trigger_price: str = "80000.00",
        price: str = "0",  # the limit price of STOP and TAKE_PROFIT (unused by the *_MARKET types)
        client_algo_id: str | None = None,  # None: a generated one
        reduce_only: bool = False,
        activation_price: str | None = None,  # TRAILING_STOP_MARKET: AP (default: the trigger price)
        callback_rate: str | None = None,  # TRAILING_STOP_MARKET: cr in percent (default "1.0")
    ) -> int:
        """Place a conditional order of the algo service (ALGO_UPDATE NEW); ``trigger_algo`` triggers it."""
        if type not in ALGO_ORDER_TYPES:
            raise SimulatorError(f"algo order type must be one of {sorted(ALGO_ORDER_TYPES)}")
        _check_side(side)
        trailing = type == "TRAILING_STOP_MARKET"
        if not trailing and (activation_price is not None or callback_rate is not None):
            raise SimulatorError("activation_price and callback_rate belong to TRAILING_STOP_MARKET")
        with self.lock:
            acct = self._acct(api_key)
            ts = self._tick(acct)
            acct.next_algo_id += 1
            algo = AlgoOrder(
                algo_id=acct.next_algo_id,
                client_algo_id=client_algo_id or self._new_client_id(acct),
                order_type=type,
                symbol=symbol,
                side=side,
                quantity=Decimal(quantity),
                trigger_price=Decimal(trigger_price),
                price=Decimal(price),
                create_time=ts,
                update_time=ts,
                reduce_only=reduce_only,
                activation_price=Decimal(activation_price or trigger_price) if trailing else None,
                callback_rate=Decimal(callback_rate or "1.0") if trailing else None,
            )
            acct.algos[algo.algo_id] = algo
            acct.open_algos[algo.algo_id] = algo
            acct.algos_by_client_id[algo.client_algo_id] = algo.algo_id
            self._emit(acct, [self._algo_event(acct, algo)])
            return algo.algo_id

    def _new_algo(self, acct: _Account, algo_id: int) -> AlgoOrder:
        algo = acct.algos.get(algo_id)
        if algo is None:
            raise SimulatorError(f"unknown algo order {algo_id}")
        if algo.status != "NEW":
            raise SimulatorError(f"algo order {algo_id} is {algo.status}")
        return algo

    def trigger_algo(self, api_key: str, algo_id: int, fill: bool = True) -> int:
        """NEW -> TRIGGERING -> (regular order NEW) -> TRIGGERED; with ``fill`` the order fills and
        the algo goes FINISHED with aq/ap. Without it, FINISHED follows when that order ends.
        Returns the regular order id."""
        with self.lock:
            acct = self._acct(api_key)
            algo = acct.algos.get(algo_id)
            events: EventBatch = []
            if algo is None or algo.status != "TRIGGERING":  # a stuck one (start_triggering) goes on
                algo = self._new_algo(acct, algo_id)
                self._set_algo_status(acct, algo, "TRIGGERING")
                events.append(self._algo_event(acct, algo))
                algo.trigger_time = algo.update_time
            market = algo.order_type.endswith("MARKET")
            order = self._create_order(
                acct,
                algo.symbol,
                algo.side,
                "MARKET" if market else "LIMIT",
                algo.order_type,
                algo.quantity,
                _ZERO if market else algo.price,
                algo.client_algo_id,
                algo.time_in_force,
                algo.reduce_only,
                stop_price=algo.trigger_price,
                algo_id=algo.algo_id,
            )
            order.activation_price, order.callback_rate = algo.activation_price, algo.callback_rate
            events.append(self._order_event(acct, order, "NEW", order.time))
            self._set_algo_status(acct, algo, "TRIGGERED")
            algo.actual_order_id = order.order_id
            events.append(self._algo_event(acct, algo))
            if fill:
                fill_price = algo.trigger_price if market else algo.price
                events += self._fill_events(acct, order, order.remaining, fill_price, maker=not market)
            self._emit(acct, events)
            return order.order_id

    def start_triggering(self, api_key: str, algo_id: int) -> None:
        """NEW -> TRIGGERING, and there it stays (it can, for a long time, on Binance): still listed by
        openAlgoOrders, not cancellable (-2011); ``trigger_algo`` or ``reject_algo`` ends it."""
        with self.lock:
            acct = self._acct(api_key)
            algo = self._new_algo(acct, algo_id)
            self._set_algo_status(acct, algo, "TRIGGERING")
            events = [self._algo_event(acct, algo)]
            algo.trigger_time = algo.update_time
            self._emit(acct, events)

    def _end_algo(self, api_key: str, algo_id: int, status: str, reason: str = "") -> None:
        with self.lock:
            acct = self._acct(api_key)
            stuck = acct.algos.get(algo_id)
            if stuck is not None and stuck.status == "TRIGGERING":
                if status != "REJECTED":  # Binance answers -2011 to a cancel of a triggering algo
                    raise SimulatorError(f"algo order {algo_id} is TRIGGERING: -2011 Unknown order sent")
                self._set_algo_status(acct, stuck, status)
                stuck.reason = reason
                self._emit(acct, [self._algo_event(acct, stuck)])
                return
            algo = self._new_algo(acct, algo_id)
            events: EventBatch = []
            if status == "REJECTED":  # the matching engine refuses it at trigger time
                self._set_algo_status(acct, algo, "TRIGGERING")
                algo.trigger_time = self._tick(acct)
                events.append(self._algo_event(acct, algo))
            self._set_algo_status(acct, algo, status)
            algo.reason = reason
            events.append(self._algo_event(acct, algo))
            self._emit(acct, events)

    def cancel_algo(self, api_key: str, algo_id: int) -> None:
        self._end_algo(api_key, algo_id, "CANCELED")

    def reject_algo(self, api_key: str, algo_id: int, reason: str = "Reduce Only reject") -> None:
        self._end_algo(api_key, algo_id, "REJECTED", reason)

    def expire_algo(self, api_key: str, algo_id: int) -> None:
        self._end_algo(api_key, algo_id, "EXPIRED")

    def account_config_update(self, api_key: str, symbol: str = "BTCUSDT", leverage: int = 20) -> None:
        with self.lock:
            acct = self._acct(api_key)
            acct.leverage[symbol] = leverage
            ts = self._tick(acct)
            event = {
                "e": "ACCOUNT_CONFIG_UPDATE",
                "E": self._tick(acct),
                "T": ts,
                "ac": {"s": symbol, "l": leverage},
            }
            self._emit(acct, [("ACCOUNT_CONFIG_UPDATE", event)])

    # ------------------------------------------------------------------ account modes and events
    def set_position_mode(self, api_key: str, dual_side: bool = True) -> None:
        """Hedge mode (LONG and SHORT positions per symbol) or one-way; refused (-4068/-4067) while a
        position or an order is open, as on Binance. No event."""
        with self.lock:
            acct = self._acct(api_key)
            if any(p.amount for p in acct.positions.values()):
                raise SimulatorError("-4068 the position side cannot be changed if there exists position")
            if acct.open_orders:
                raise SimulatorError("-4067 the position side cannot be changed if there exists open orders")
            acct.dual_side = bool(dual_side)

    def set_margin_type(self, api_key: str, symbol: str = "BTCUSDT", margin_type: str = "ISOLATED") -> None:
        """ISOLATED or CROSSED for a symbol; refused (-4048) while one of its positions is open. No event."""
        if margin_type not in ("ISOLATED", "CROSSED"):
            raise SimulatorError("margin_type is ISOLATED or CROSSED")
        with self.lock:
            acct = self._acct(api_key)
            if any(p.amount for p in acct.positions.values() if p.symbol == symbol):
                raise SimulatorError("-4048 margin type cannot be changed if there exists position")
            if margin_type == "ISOLATED":
                acct.isolated_symbols.add(symbol)
            else:
                acct.isolated_symbols.discard(symbol)
            for pos in acct.positions.values():
                if pos.symbol == symbol:
                    pos.isolated, pos.isolated_wallet = margin_type == "ISOLATED", _ZERO

    def _wallet_event(
        self, acct: _Account, reason: str, change: Decimal, symbol: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """ACCOUNT_UPDATE of a wallet change that is no fill (``a.S``: the symbol of a FUNDING_FEE)."""
        ts = self._tick(acct)
        acct.wallet += change
        acct.wallet_update_time = ts
        update: dict[str, Any] = {
            "m": reason,
            "B": [
                {
                    "a": "USDT",
                    "wb": fmt8(acct.wallet),
                    "cw": fmt8(self._cross_wallet(acct)),
                    "bc": fmt8(change),
                }
            ],
            "P": [],
        }
        if symbol is not None:
            update["S"] = symbol
        return "ACCOUNT_UPDATE", {"e": "ACCOUNT_UPDATE", "E": self._tick(acct), "T": ts, "a": update}

    def deposit(self, api_key: str, amount: str = "100.00000000") -> None:
        """USDT arrives in (or, negative, leaves) the futures wallet: ACCOUNT_UPDATE m=DEPOSIT / WITHDRAW."""
        change = Decimal(amount)
        with self.lock:
            acct = self._acct(api_key)
            self._emit(acct, [self._wallet_event(acct, "DEPOSIT" if change >= 0 else "WITHDRAW", change)])

    def funding_fee(self, api_key: str, symbol: str = "BTCUSDT", amount: str = "-0.12345678") -> None:
        """A funding payment of a cross position: ACCOUNT_UPDATE m=FUNDING_FEE with ``a.S``, no ``P``."""
        with self.lock:
            acct = self._acct(api_key)
            self._emit(acct, [self._wallet_event(acct, "FUNDING_FEE", Decimal(amount), symbol)])

    def margin_call(self, api_key: str) -> None:
        """MARGIN_CALL listing every open position (a stand-in: no margin model decides when)."""
        with self.lock:
            acct = self._acct(api_key)
            positions = []
            for pos in acct.positions.values():
                if not pos.amount:
                    continue
                mark = self._price(acct, pos.symbol)
                positions.append(
                    {
                        "s": pos.symbol,
                        "ps": pos.position_side,
                        "pa": str(pos.amount),
                        "mt": "ISOLATED" if pos.isolated else "CROSSED",
                        "iw": fmt8(pos.isolated_wallet),
                        "mp": fmt8(mark),
                        "up": fmt8(pos.unrealized(mark)),
                        "mm": fmt8(abs(pos.amount) * mark * MAINT_MARGIN_RATE),
                    }
                )
            event = {
                "e": "MARGIN_CALL",
                "E": self._tick(acct),
                "cw": fmt8(self._cross_wallet(acct)),
                "p": positions,
            }
            self._emit(acct, [("MARGIN_CALL", event)])

    def liquidate(self, api_key: str, symbol: str = "BTCUSDT", position_side: str = "BOTH") -> int:
        """The exchange closes a position: one ORDER_TRADE_UPDATE x=CALCULATED (type LIQUIDATION, client
        id ``autoclose-...``, FILLED at the current price) and its ACCOUNT_UPDATE. Returns the order id."""
        with self.lock:
            acct = self._acct(api_key)
            pos = acct.positions.get((symbol, position_side))
            if pos is None or not pos.amount:
                raise SimulatorError(f"no open {symbol} {position_side} position to liquidate")
            ts = self._tick(acct)
            order = self._create_order(
                acct,
                symbol,
                "SELL" if pos.amount > 0 else "BUY",
                "LIQUIDATION",
                "LIQUIDATION",
                abs(pos.amount),
                self._price(acct, symbol),
                f"autoclose-{ts}",
                "IOC",
                True,
            )
            order.position_side = position_side
            events = self._fill_events(
                acct, order, order.remaining, self._price(acct, symbol), maker=False, execution="CALCULATED"
            )
            self._emit(acct, events)
            return order.order_id

    def multi_assets_mode(self, api_key: str, enabled: bool = True) -> None:
        """ACCOUNT_CONFIG_UPDATE with ``ai`` (multi-assets mode), not ``ac``."""
        with self.lock:
            acct = self._acct(api_key)
            acct.multi_assets = bool(enabled)
            ts = self._tick(acct)
            event = {
                "e": "ACCOUNT_CONFIG_UPDATE",
                "E": self._tick(acct),
                "T": ts,
                "ai": {"j": acct.multi_assets},
            }
            self._emit(acct, [("ACCOUNT_CONFIG_UPDATE", event)])

    def strategy_update(
        self, api_key: str, strategy_id: int = 8000, status: str = "NEW", symbol: str = "BTCUSDT"
    ) -> None:
        """STRATEGY_UPDATE of a (grid) trading strategy: NEW, WORKING, CANCELLED, EXPIRED."""
        with self.lock:
            acct = self._acct(api_key)
            ts = self._tick(acct)
            body = {"si": strategy_id, "st": "GRID", "ss": status, "s": symbol, "ut": ts, "c": 8007}
            self._emit(
                acct,
                [("STRATEGY_UPDATE", {"e": "STRATEGY_UPDATE", "T": ts, "E": self._tick(acct), "su": body})],
            )

    def grid_update(self, api_key: str, strategy_id: int = 8000, symbol: str = "BTCUSDT") -> None:
        """GRID_UPDATE of a grid strategy (realized PnL, unmatched average price and quantity, ...)."""
        with self.lock:
            acct = self._acct(api_key)
            ts = self._tick(acct)
            body = {
                "si": strategy_id,
                "st": "GRID",
                "ss": "WORKING",
                "s": symbol,
                "r": "-0.00300716",
                "up": str(self._price(acct, symbol)),
                "uq": "-0.001",
                "uf": "-0.00300716",
                "mp": "0.0",
                "ut": ts,
            }
            self._emit(
                acct, [("GRID_UPDATE", {"e": "GRID_UPDATE", "T": ts, "E": self._tick(acct), "gu": body})]
            )

    def conditional_order_trigger_reject(
        self, api_key: str, symbol: str = "BTCUSDT", order_id: int = 0, reason: str = "Reduce only reject"
    ) -> None:
        """CONDITIONAL_ORDER_TRIGGER_REJECT (``or``: symbol, order id, reason)."""
        with self.lock:
            acct = self._acct(api_key)
            ts = self._tick(acct)
            event = {
                "e": "CONDITIONAL_ORDER_TRIGGER_REJECT",
                "E": self._tick(acct),
                "T": ts,
                "or": {"s": symbol, "i": order_id, "r": reason},
            }
            self._emit(acct, [("CONDITIONAL_ORDER_TRIGGER_REJECT", event)])

    # ------------------------------------------------------------------ scenario
    def step(self, api_key: str, n: int = 1) -> None:
        """Run ``n`` scenario steps for one account: deterministic for a given seed and history."""
        with self.lock:
            acct = self._acct(api_key)
            for _ in range(n):
                self._scenario_step(acct)

    def _scenario_step(self, acct: _Account) -> None:
        rng = acct.rng
        key = acct.creds.api_key
        acct.steps += 1
        open_orders = list(acct.open_orders.values())
        open_algos = [a for a in acct.open_algos.values() if a.status == "NEW"]
        room = len(open_orders) < self.max_open_orders
        roll = rng.random()
        if roll < 0.30 and room:
            self._scenario_limit(acct)
        elif roll < 0.36 and room:
            symbol = rng.choice(SCENARIO_SYMBOLS)
            self._walk(acct, symbol)
            self.place_order(
                key, symbol, rng.choice(("BUY", "SELL")), "MARKET", str(self._scenario_qty(acct, symbol))
            )
        elif roll < 0.56 and open_orders:
            order = rng.choice(open_orders)
            step = self._info(order.symbol).step
            steps_left = int(order.remaining / step)
            qty = step * rng.randint(1, steps_left - 1) if steps_left > 1 else order.remaining
            self.fill(key, order.order_id, str(qty))
        elif roll < 0.66 and open_orders:
            self.fill(key, rng.choice(open_orders).order_id)
        elif roll < 0.74 and open_orders:
            self.cancel(key, rng.choice(open_orders).order_id)
        elif roll < 0.81 and open_orders:
            order = rng.choice(open_orders)
            info = self._info(order.symbol)
            new_price = max(info.tick, order.price + info.tick * rng.randint(-20, 20))
            quantity = None
            if rng.random() < 0.3:
                quantity = str(order.executed_qty + info.step * rng.randint(1, 50))
            self.amend(key, order.order_id, price=str(new_price), quantity=quantity)
        elif roll < 0.84 and open_orders:
            self.expire(key, rng.choice(open_orders).order_id)
        elif roll < 0.90 and len(open_algos) < self.max_open_algos:
            self._scenario_algo(acct)
        elif roll < 0.98 and open_algos:
            algo = rng.choice(open_algos)
            what = rng.random()
            if what < 0.6:
                self.trigger_algo(key, algo.algo_id)
            elif what < 0.8:
                self.cancel_algo(key, algo.algo_id)
            elif what < 0.9:
                self.reject_algo(key, algo.algo_id)
            else:
                self.expire_algo(key, algo.algo_id)
        elif roll >= 0.99:
            self.account_config_update(key, rng.choice(SCENARIO_SYMBOLS), rng.choice((5, 10, 20, 25, 50)))
        elif room:
            self._scenario_limit(acct)
        else:
            self.fill(key, open_orders[0].order_id)

    def _walk(self, acct: _Account, symbol: str) -> Decimal:
        info = self._info(symbol)
        price = self._price(acct, symbol)
        price = max(
            info.tick, (price * (1 + Decimal(acct.rng.randint(-20, 20)) / 100000)).quantize(info.tick)
        )
        acct.prices[symbol] = price
        return price

    def _scenario_qty(self, acct: _Account, symbol: str) -> Decimal:
        info = self._info(symbol)
        price = self._price(acct, symbol)
        # between ~20 and ~1000 USDT of notional, in whole lot steps
        steps = max(1, int(Decimal(acct.rng.randint(20, 1000)) / price / info.step))
        return (info.step * steps).quantize(info.step)

    def _scenario_limit(self, acct: _Account) -> None:
        rng = acct.rng
        symbol = rng.choice(SCENARIO_SYMBOLS)
        info = self._info(symbol)
        price = self._walk(acct, symbol)
        side = rng.choice(("BUY", "SELL"))
        offset = Decimal(rng.randint(1, 50)) / 10000
        limit = (price * (1 - offset if side == "BUY" else 1 + offset)).quantize(info.tick)
        qty = self._scenario_qty(acct, symbol)
        self.place_order(acct.creds.api_key, symbol, side, "LIMIT", str(qty), str(max(limit, info.tick)))

    def _scenario_algo(self, acct: _Account) -> None:
        rng = acct.rng
        symbol = rng.choice(SCENARIO_SYMBOLS)
        info = self._info(symbol)
        price = self._walk(acct, symbol)
        kind = rng.choice(("STOP_MARKET", "TAKE_PROFIT_MARKET", "STOP", "TAKE_PROFIT"))
        side = rng.choice(("BUY", "SELL"))
        offset = Decimal(rng.randint(5, 200)) / 10000
        trigger = (
            price * (1 + offset if (side == "BUY") == kind.startswith("STOP") else 1 - offset)
        ).quantize(info.tick)
        limit = "0" if kind.endswith("MARKET") else str(trigger)
        self.place_algo(
            acct.creds.api_key, symbol, side, kind, str(self._scenario_qty(acct, symbol)), str(trigger), limit
        )


def scenario_symbols() -> Sequence[str]:
    return SCENARIO_SYMBOLS


__all__ = [
    "AlgoOrder",
    "ApiError",
    "Engine",
    "EventBatch",
    "Order",
    "SimAccount",
    "SimulatorError",
    "fmt_avg",
    "split_symbol",
]
