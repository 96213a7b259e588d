"""The WebSocket API of the simulator (``/ws-fapi/v1``): listenKeys managed over a WebSocket.

Binance serves it at ``wss://ws-fapi.binance.com/ws-fapi/v1``; here it is a route of the same server.
Requests are JSON ``{"id": .., "method": .., "params": {..}}``; every reply carries the request's
``id``, an HTTP-like ``status`` and ``rateLimits`` (the IP's REQUEST_WEIGHT of the last minute, shared
with REST), and either ``result`` or ``error`` (``{"code", "msg"}``, Binance's codes). Methods (weight 1):

- ``userDataStream.start`` ``{"apiKey"}`` -> ``{"listenKey"}`` (the active key, extended, if there is one)
- ``userDataStream.ping`` ``{"apiKey"}`` -> ``{"listenKey"}``; -1125 when the account has no key
- ``userDataStream.stop`` ``{"apiKey"}`` -> ``{}``; like ``DELETE /fapi/v1/listenKey``, the key's
  connections get listenKeyExpired and are closed
"""

from __future__ import annotations

import json
from typing import Any

from kraite_mp.simulator.engine import ApiError, Engine
from kraite_mp.simulator.rest import RateLimiter
from kraite_mp.simulator.streams import Conn, StreamHub

#: Request weight of each userDataStream method.
WEIGHT = 1


class WsApi:
    """``StreamHub.ws_api``: one reply per request of a ``/ws-fapi/v1`` connection."""

    def __init__(self, engine: Engine, limiter: RateLimiter, hub: StreamHub) -> None:
        self.engine = engine
        self.limiter = limiter
        self.hub = hub
        #: Requests answered, per method.
        self.requests: dict[str, int] = {}

    def handle(self, conn: Conn, request: dict[str, Any]) -> dict[str, Any]:
        rid, method = request.get("id"), request.get("method")
        raw_params = request.get("params")
        params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
        ip = conn.request.remote or "127.0.0.1"
        self.requests[str(method)] = self.requests.get(str(method), 0) + 1
        refused = self.limiter.check(ip, WEIGHT)
        if refused is not None:
            body = json.loads(refused.body) if isinstance(refused.body, bytes) else {}
            return self._reply(
                rid, ip, refused.status, error={"code": body.get("code"), "msg": body.get("msg")}
            )
        api_key = str(params.get("apiKey") or "")
        try:
            if not api_key:
                raise ApiError(
                    400, -1102, "Mandatory parameter 'apiKey' was not sent, was empty/null, or malformed."
                )
            if method == "userDataStream.start":
                result: dict[str, Any] = {"listenKey": self.engine.listen_key_create(api_key)}
            elif method == "userDataStream.ping":
                result = {"listenKey": self.engine.listen_key_keepalive(api_key)}
            elif method == "userDataStream.stop":
                key = self.engine.listen_key_delete(api_key)
                if key is not None:
                    self.hub.close_listen_key(key)
                result = {}
            else:
                raise ApiError(400, -1100, f"Unknown method: {str(method)[:60]!r}")
        except ApiError as e:
            return self._reply(rid, ip, e.status, error={"code": e.code, "msg": e.msg})
        return self._reply(rid, ip, 200, result=result)

    def _reply(
        self,
        rid: Any,
        ip: str,
        status: int,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        reply: dict[str, Any] = {"id": rid, "status": status}
        if error is not None:
            reply["error"] = error
        else:
            reply["result"] = result
        reply["rateLimits"] = [
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": self.limiter.limit,
                "count": self.limiter.used(ip),
            }
        ]
        return reply


__all__ = ["WsApi"]
