"""One reconciliation pass over many accounts: the ``sync-orders`` command's loop and the periodic child.

Accounts share one HTTP session; a 429/418 ends the pass (the rest wait for the next one), a lost
database connection ends it too, and anything else stays with the account it happened to.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg2
import requests

from kraite_mp import exitcodes
from kraite_mp.binance.rest import BinanceRest
from kraite_mp.logs import describe_error
from kraite_mp.reconcile.result import ReconcileResult, ReconcileStatus
from kraite_mp.reconcile.sweep import reconcile_with
from kraite_mp.store.accounts import Account, SecretKeyError
from kraite_mp.store.db import is_transient

if TYPE_CHECKING:
    from kraite_mp.config import Settings
    from kraite_mp.supervisor.context import ChildContext

log = logging.getLogger(__name__)


def reconcile_accounts(
    conn: Any,
    settings: Settings,
    accounts: list[Account],
    *,
    mode: str,
    stop: threading.Event,
    on_result: Callable[[int, ReconcileResult], object] | None = None,
) -> list[ReconcileResult]:
    """One pass over ``accounts`` (one shared HTTP session); stops early on ``stop`` or a 429/418."""
    results: list[ReconcileResult] = []
    with requests.Session() as session:
        for index, account in enumerate(accounts):
            if stop.is_set():
                break
            try:
                client = BinanceRest.for_account(settings, account, session=session, stop=stop)
            except SecretKeyError as e:  # wrong KRAITE_SECRET_KEY: no account can be read, say it once each
                result = ReconcileResult(account.id, account.name, status=ReconcileStatus.ERROR, error=str(e))
                log.error("account %s: %s", account.id, e)
                results.append(result)
                if on_result is not None:
                    on_result(index, result)
                continue
            left = client.blocked_for_s()
            if left > 0:
                log.warning(
                    "Binance refuses calls for %.0fs more (429/418): %d account(s) left for the next pass",
                    left,
                    len(accounts) - index,
                )
                break
            try:
                result = reconcile_with(conn, settings, account, rest=client, mode=mode)
            except psycopg2.Error as e:
                if conn.closed:
                    raise  # the connection is gone: the caller decides (the child exits TEMPFAIL)
                # the connection survived (a deadlock, a constraint): only this account's results are lost
                conn.rollback()
                log.error(
                    "account %s: database error, its results are dropped for this pass: %s",
                    account.id,
                    describe_error(e),
                )
                result = ReconcileResult(
                    account.id,
                    account.name,
                    status=ReconcileStatus.ERROR,
                    error=f"database: {type(e).__name__}",
                )
            results.append(result)
            if on_result is not None:
                on_result(index, result)
    return results


def keep_audit_partitions(conn: Any, retention_days: int) -> None:
    """``api_data_stream``'s upkeep, once per sync pass (one pass per fleet: the mark-price leader's): the
    next days' partitions made, those past ``retention_days`` dropped. Nothing to do costs two catalog
    queries; a failure is logged and never stops the pass (the days are made a week ahead)."""
    from kraite_mp.store.retention import maintain

    try:
        report = maintain(conn, retention_days)
    except psycopg2.Error as e:
        if conn.closed:
            raise
        conn.rollback()
        log.warning("api_data_stream upkeep failed (%s); the next pass tries again", describe_error(e))
        return
    pruned = report.pruned
    if report.created or pruned.dropped or pruned.default_rows_deleted:
        log.info(
            "api_data_stream: %d day partition(s) made, %d dropped (keeping %s onwards), %d late row(s) kept,"
            " %d row(s) deleted from the default partition",
            len(report.created),
            len(pruned.dropped),
            pruned.cutoff,
            pruned.moved_late_rows,
            pruned.default_rows_deleted,
        )
    if pruned.busy:
        log.info("api_data_stream: %s busy, left for the next pass", ", ".join(pruned.busy))


def run_sync_child(ctx: ChildContext) -> int:
    """One reconciliation pass (mode auto) over the accounts this supervisor owns; exit 0."""
    from kraite_mp.store.db import DatabaseUnavailable, connect
    from kraite_mp.supervisor.ownership import owned_accounts

    settings = ctx.settings
    try:
        conn = connect(settings.database_url, application_name="kraite-mp sync")
    except DatabaseUnavailable as e:
        ctx.fail(str(e))
        log.error("%s", e)
        return exitcodes.EXIT_TEMPFAIL
    try:
        keep_audit_partitions(conn, settings.audit.retention_days)
        accounts = owned_accounts(conn, settings)
        # an account whose key Binance refused is retried by its stream (supervisor.fatal_retry_s), and at
        # once by `accounts update`/`enable`: sweeping it every pass would only spend weight on refusals
        refused = [a for a in accounts if a.credentials_error is not None]
        if refused:
            accounts = [a for a in accounts if a.credentials_error is None]
            log.info(
                "skipping %d account(s) with refused credentials (%s): fix them with `kraite-mp accounts update`",
                len(refused),
                ", ".join(str(a.id) for a in refused),
            )
        total = len(accounts)
        ctx.beat("syncing", force=True, accounts=f"0/{total}", skipped=len(refused))

        def progress(index: int, result: ReconcileResult) -> None:
            ctx.beat("syncing", accounts=f"{index + 1}/{total}", weight=result.weight)
            log.info("%s", result.summary())

        try:
            results = reconcile_accounts(
                conn, settings, accounts, mode="auto", stop=ctx.stop, on_result=progress
            )
        except Exception as e:
            if not is_transient(e):
                raise
            ctx.fail(f"PostgreSQL connection lost: {type(e).__name__}")
            log.error("PostgreSQL connection lost during the sync pass: %s", e)
            return exitcodes.EXIT_TEMPFAIL
        failed = [r for r in results if r.status is not ReconcileStatus.OK]
        ctx.beat(
            "done",
            force=True,
            accounts=f"{len(results)}/{total}",
            skipped=len(refused),
            failed=len(failed),
            weight=sum(r.weight for r in results),
            transitions=sum(r.transitions for r in results),
        )
        return exitcodes.EXIT_OK
    finally:
        conn.close()
