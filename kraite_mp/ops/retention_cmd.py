"""``kraite-mp db prune``: make ``api_data_stream``'s day partitions ahead, drop the ones past
``audit.retention_days`` (kraite_mp.store.retention, docs/RETENTION.md)."""

from __future__ import annotations

import click

from kraite_mp import exitcodes
from kraite_mp.ops.cli import connected, fail, get_settings


@click.command("prune")
@click.option("--dry-run", is_flag=True, help="Change nothing; print what would be made and dropped.")
@click.pass_context
def prune_cmd(ctx: click.Context, dry_run: bool) -> None:
    """Make the day partitions of api_data_stream ahead and drop those older than audit.retention_days.

    One line per partition made or dropped, then a summary. Exit 75 when a lock was busy (what it held
    up is left for the next run), 0 otherwise."""
    import psycopg2

    from kraite_mp.store.db import is_transient
    from kraite_mp.store.retention import PartitionsBusy, ensure_partitions, prune_report

    settings = get_settings(ctx)
    retention_days = settings.audit.retention_days
    would = "would " if dry_run else ""
    with connected(ctx) as conn:
        try:
            try:
                created = ensure_partitions(conn, dry_run=dry_run)
            except PartitionsBusy as e:
                click.echo(f"kraite-mp: {e}", err=True)
                created = None
            report = prune_report(conn, retention_days, dry_run=dry_run)
        except psycopg2.Error as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            what = "PostgreSQL unavailable" if is_transient(e) else "PostgreSQL refused the prune"
            fail(
                ctx, f"{what}: {first}", exitcodes.EXIT_TEMPFAIL if is_transient(e) else exitcodes.EXIT_ERROR
            )
    for name in created or []:
        click.echo(f"{would}create {name}")
    for name in report.dropped:
        click.echo(f"{would}drop {name}")
    for name in report.busy:
        click.echo(f"busy {name} (left for the next run)")
    click.echo(
        f"{'dry run: ' if dry_run else ''}retention {retention_days} days (keeping {report.cutoff} onwards):"
        f" {len(created or [])} partition(s) {would}created, {len(report.dropped)} {would}dropped,"
        f" {report.moved_late_rows} late row(s) {would}kept in the default partition,"
        f" {report.default_rows_deleted} row(s) {would}deleted from it"
    )
    if created is None or report.busy:
        ctx.exit(exitcodes.EXIT_TEMPFAIL)
