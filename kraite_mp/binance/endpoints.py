"""The USD-M Futures REST routes kraite-mp calls and their request weights (docs/PROTOCOL.md).

Declarative: the client (``kraite_mp.binance.rest``) takes each call's weight from the egress budget by
this table before it sends it, and the background sweeps size what they prepay with it.
"""

from __future__ import annotations

#: The listenKey route: its calls are what a stream waits on (the REST budget keeps them a reserve).
LISTEN_KEY_PATH = "/fapi/v1/listenKey"
#: Request weight per (method, path, has_symbol) (docs/PROTOCOL.md); used to account what a caller spent.
ENDPOINT_WEIGHTS: dict[tuple[str, str, bool], int] = {
    ("GET", "/fapi/v1/openOrders", True): 1,
    ("GET", "/fapi/v1/openOrders", False): 40,
    ("GET", "/fapi/v1/openAlgoOrders", True): 1,
    ("GET", "/fapi/v1/openAlgoOrders", False): 40,
    ("GET", "/fapi/v1/order", True): 1,
    ("GET", "/fapi/v1/algoOrder", False): 1,
    ("GET", "/fapi/v1/allOrders", True): 5,
    ("GET", "/fapi/v1/allAlgoOrders", True): 5,
    ("GET", "/fapi/v3/positionRisk", False): 5,
    ("GET", "/fapi/v3/positionRisk", True): 5,
    ("GET", "/fapi/v3/balance", False): 5,
    ("GET", "/fapi/v3/account", False): 5,
    ("GET", "/fapi/v1/time", False): 1,
    ("POST", LISTEN_KEY_PATH, False): 1,
    ("PUT", LISTEN_KEY_PATH, False): 1,
    ("DELETE", LISTEN_KEY_PATH, False): 1,
}
