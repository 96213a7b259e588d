"""Graceful close of a working WebSocket (``streams.connection``): send the close frame, then keep
receiving and hand every data frame on until the server's close frame or a deadline, because whatever
the server sent before it saw our close is already on the wire (websocket-client's own ``close()``
would read and discard it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import websocket

from kraite_mp.streams.liveness import describe


def drain_connection(
    ws: websocket.WebSocket, on_frame: Callable[[bytes], object], timeout_s: float, log: logging.Logger
) -> int:
    """Send the close frame, then hand every data frame to ``on_frame`` until the server's close frame
    or ``timeout_s``; the number of frames read."""
    deadline = time.monotonic() + timeout_s
    try:
        ws.send_close()
    except (websocket.WebSocketException, OSError) as e:
        log.info("close frame not sent (%s): dropping the connection", describe(e))
        return 0
    drained, outcome = 0, "the server's close frame"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            outcome = f"the {timeout_s:g}s deadline"
            break
        try:
            ws.settimeout(left)
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            outcome = f"the {timeout_s:g}s deadline"
            break
        except (websocket.WebSocketException, OSError) as e:
            outcome = describe(e)
            break
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            drained += 1
            on_frame(frame.data)
        elif opcode == websocket.ABNF.OPCODE_CLOSE:
            break
    log.info("closed: %d frame(s) received after our close frame, until %s", drained, outcome)
    return drained
