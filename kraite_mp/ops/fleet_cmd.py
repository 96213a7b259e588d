"""``kraite-mp fleet``: the members of the fleet (``supervisor.ownership = "fleet"``), from Redis."""

from __future__ import annotations

import json
import time

import click

from kraite_mp import exitcodes
from kraite_mp.ops.cli import fail, get_settings
from kraite_mp.supervisor.fleet import MARK_PRICE, fleet_members, lease_key


@click.command("fleet")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.pass_context
def fleet_command(ctx: click.Context, as_json: bool) -> None:
    """List the live members, how many accounts each streams, the mark-price leader and when each
    member's registration (and so its leases) would expire without a renewal."""
    import redis

    from kraite_mp.messages import redis_client

    settings = get_settings(ctx)
    client = redis_client(settings.redis_url)
    try:
        members = fleet_members(client, settings.redis_namespace)
        leader_token = client.get(lease_key(settings.redis_namespace, MARK_PRICE))
        leader_ttl_ms = client.pttl(lease_key(settings.redis_namespace, MARK_PRICE))
    except redis.RedisError as e:
        fail(
            ctx,
            f"Redis unreachable at {settings.redis_url.split('@')[-1]}: {type(e).__name__}",
            exitcodes.EXIT_TEMPFAIL,
        )
    finally:
        client.close()
    leader = None
    if isinstance(leader_token, bytes):
        leader = leader_token.decode("utf-8", "replace").rsplit(":", 1)[0]
    data = {
        "namespace": settings.redis_namespace,
        "members": members,
        "mark_price_leader": leader,
        "mark_price_lease_expires_in_s": round(leader_ttl_ms / 1000, 1)
        if isinstance(leader_ttl_ms, int) and leader_ttl_ms > 0
        else None,
        "accounts": sum(int(m.get("accounts", 0)) for m in members),
        "ts": time.time(),
    }
    if as_json:
        click.echo(json.dumps(data, sort_keys=True))
        return
    if not members:
        click.echo(f"no live fleet members in namespace {settings.redis_namespace!r}")
        return
    click.echo(
        f"{'HOST':<24} {'ACCOUNTS':>8} {'LEASES':>6} {'HANDING OVER':>12} {'MARK-PRICE':>10} {'EXPIRES IN':>10}"
    )
    for m in members:
        mark = "leader" if m.get("mark_price") else ""
        click.echo(
            f"{m['host_id']:<24} {m.get('accounts', 0):>8} {m.get('leases', 0):>6} {m.get('handing_over', 0):>12}"
            f" {mark:>10} {m['expires_in_s']:>9.1f}s"
        )
    click.echo(
        f"{len(members)} member(s), {data['accounts']} account(s) streamed, mark-price leader: {leader or 'none'}"
    )
