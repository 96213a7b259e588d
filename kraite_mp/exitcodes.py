"""Named process exit codes (sysexits.h values where one fits).

The supervisor's restart policy reads them: FATAL codes are not hot-looped.
"""

from __future__ import annotations

#: Normal exit (asked to stop).
EXIT_OK = 0
#: Unexpected error: restart with backoff.
EXIT_ERROR = 1
#: A file cannot be created, or exists and is not replaced (``kraite-mp init`` without ``--force``).
EXIT_CANTCREAT = 73
#: Transient failure (network, Redis, PostgreSQL down): restart with backoff.
EXIT_TEMPFAIL = 75
#: The exchange rejected the account's credentials (-2015): FATAL, retried only after a long delay.
EXIT_FATAL_CREDENTIALS = 77
#: Bad configuration: FATAL.
EXIT_FATAL_CONFIG = 78

FATAL_EXIT_CODES: frozenset[int] = frozenset({EXIT_FATAL_CREDENTIALS, EXIT_FATAL_CONFIG})

NAMES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_ERROR: "error",
    EXIT_CANTCREAT: "cantcreat",
    EXIT_TEMPFAIL: "tempfail",
    EXIT_FATAL_CREDENTIALS: "fatal-credentials",
    EXIT_FATAL_CONFIG: "fatal-config",
}


def describe(code: int) -> str:
    return NAMES.get(code, f"code {code}")
