"""Log redaction: registered secrets and listen keys never reach a log line."""

from __future__ import annotations

import pytest

from kraite_mp.logs import redact, register_secret


@pytest.mark.unit
def test_redaction_scrubs_registered_secrets_and_listen_keys() -> None:
    register_secret("s3cr3t-value-xyz")
    line = 'GET /private/ws?listenKey=abcDEF123&events=X secret s3cr3t-value-xyz {"listenKey": "zzzKEY"}'
    out = redact(line)
    assert "abcDEF123" not in out and "s3cr3t-value-xyz" not in out and "zzzKEY" not in out
