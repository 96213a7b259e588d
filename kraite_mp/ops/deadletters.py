"""Dead-lettered Dramatiq messages: count, list, replay (``kraite-mp dead-letters``, ``status``).

Dramatiq's RedisBroker (``dramatiq/brokers/redis/dispatch.lua``) keeps, per queue, under the broker
namespace ``<redis_namespace>:dramatiq``:

- ``<ns>:<queue>``: a list of Redis message ids waiting to be fetched;
- ``<ns>:<queue>.msgs``: a hash Redis message id -> encoded message;
- ``<ns>:<queue>.XQ``: a sorted set of the dead-lettered ids, scored by the time (ms) they died;
- ``<ns>:<queue>.XQ.msgs``: a hash of their encoded messages.

A message is dead-lettered when its retries ran out (``jobs.max_retries``); Dramatiq drops dead letters
after 7 days. Replaying one moves it back atomically (one Lua script): its retry counter and last
traceback are reset, its id stays, so a replayed frame is still processed at most once (the jobs are
idempotent by frame id).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from kraite_mp import exitcodes
from kraite_mp.logs import describe_error

if TYPE_CHECKING:
    from kraite_mp.config import Settings

#: Moves one dead letter back: KEYS = xq, xq.msgs, queue, queue.msgs; ARGV = id, new message data.
#: Returns 1 when moved, 0 when the id was no longer dead-lettered (replayed or expired meanwhile).
REPLAY_SCRIPT = """
if redis.call("zrem", KEYS[1], ARGV[1]) == 0 then
    return 0
end
redis.call("hdel", KEYS[2], ARGV[1])
redis.call("hset", KEYS[4], ARGV[1], ARGV[2])
redis.call("rpush", KEYS[3], ARGV[1])
return 1
"""

#: ``list`` shows at most this many dead letters per queue.
LIST_LIMIT = 50


class DeadLettersUnavailable(RuntimeError):
    """Redis could not be read; the message carries no password."""


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    redis_id: str
    died_at_ms: int
    actor: str
    #: The message's own id (Dramatiq's), the frame's account and the retries it went through.
    message_id: str
    account_id: Any
    retries: Any

    def as_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "id": self.redis_id,
            "died_at": round(self.died_at_ms / 1000, 3),
            "actor": self.actor,
            "message_id": self.message_id,
            "account_id": self.account_id,
            "retries": self.retries,
        }


def xq_key(namespace: str, queue: str) -> str:
    return f"{namespace}:{queue}.XQ"


def _client(redis_url: str) -> Any:
    from kraite_mp.messages import redis_client

    return redis_client(redis_url)


def _fail(redis_url: str, e: BaseException) -> DeadLettersUnavailable:
    from kraite_mp.config import redact_url

    return DeadLettersUnavailable(f"Redis unreachable at {redact_url(redis_url)}: {describe_error(e)}")


def counts(redis_url: str, namespace: str, queues: list[str]) -> dict[str, int]:
    """Dead letters per queue; raises DeadLettersUnavailable."""
    import redis

    client = _client(redis_url)
    try:
        return {q: int(client.zcard(xq_key(namespace, q))) for q in queues}
    except redis.RedisError as e:
        raise _fail(redis_url, e) from None
    finally:
        client.close()


def _decode(queue: str, redis_id: str, score: float, raw: bytes | None) -> DeadLetter:
    import dramatiq

    actor = message_id = "?"
    account_id = retries = None
    if raw is not None:
        try:
            message = dramatiq.Message.decode(raw)
        except Exception:  # noqa: BLE001 - an undecodable dead letter is still listed (and replayable)
            pass
        else:
            actor, message_id = message.actor_name, message.message_id
            retries = message.options.get("retries")
            args = message.args
            account_id = args[0] if args and isinstance(args[0], int) else message.kwargs.get("account_id")
    return DeadLetter(queue, redis_id, int(score), actor, message_id, account_id, retries)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def list_dead_letters(
    redis_url: str, namespace: str, queue: str, limit: int = LIST_LIMIT
) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters of ``queue``."""
    import redis

    client = _client(redis_url)
    key = xq_key(namespace, queue)
    try:
        members = client.zrange(key, 0, limit - 1, withscores=True)
        ids = [_text(m) for m, _ in members]
        raws = client.hmget(f"{key}.msgs", ids) if ids else []
    except redis.RedisError as e:
        raise _fail(redis_url, e) from None
    finally:
        client.close()
    return [_decode(queue, i, score, r) for i, (_, score), r in zip(ids, members, raws, strict=True)]


def _reset(raw: bytes) -> bytes:
    """The message with a fresh retry budget (Dramatiq's Retries counts ``options["retries"]``)."""
    import dramatiq

    try:
        message = dramatiq.Message.decode(raw)
    except Exception:  # noqa: BLE001 - replay it as it is; the worker dead-letters it again if it must
        return raw
    options = {k: v for k, v in message.options.items() if k not in ("retries", "traceback", "eta")}
    return message._replace(options=options, queue_name=message.queue_name.removesuffix(".DQ")).encode()


def replay(redis_url: str, namespace: str, queue: str, ids: list[str] | None) -> tuple[int, list[str]]:
    """Move dead letters of ``queue`` back onto it (``ids`` None: all); (replayed, ids not found)."""
    import redis

    client = _client(redis_url)
    key = xq_key(namespace, queue)
    replayed, missing = 0, []
    try:
        script = client.register_script(REPLAY_SCRIPT)
        wanted = ids if ids is not None else [_text(m) for m in client.zrange(key, 0, -1)]
        for redis_id in wanted:
            raw = client.hget(f"{key}.msgs", redis_id)
            if raw is None:
                missing.append(redis_id)
                continue
            keys = [key, f"{key}.msgs", f"{namespace}:{queue}", f"{namespace}:{queue}.msgs"]
            if script(keys=keys, args=[redis_id, _reset(raw)]):
                replayed += 1
            else:
                missing.append(redis_id)
    except redis.RedisError as e:
        raise _fail(redis_url, e) from None
    finally:
        client.close()
    return replayed, missing


def format_age(died_at_ms: int, now: float | None = None) -> str:
    age = max(0.0, (time.time() if now is None else now) - died_at_ms / 1000)
    if age < 120:
        return f"{age:.0f}s"
    if age < 7200:
        return f"{age / 60:.0f}m"
    return f"{age / 3600:.1f}h"


# -- the command --------------------------------------------------------------------------------
def _queues(settings: Settings, queue: str | None) -> list[str]:
    from kraite_mp.messages import RECONCILE_QUEUE

    return [queue] if queue else [settings.user_data_stream.queue_name, RECONCILE_QUEUE]


@click.group("dead-letters")
def dead_letters() -> None:
    """Messages Dramatiq gave up on (retries exhausted): count, list, replay."""


@dead_letters.command("list")
@click.option("--queue", default=None, help="Only this queue (default: user-data and reconcile).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_command(ctx: click.Context, queue: str | None, as_json: bool) -> None:
    """Count the dead letters per queue and show the oldest ones (never their frames)."""
    from kraite_mp.messages import broker_namespace
    from kraite_mp.ops.cli import fail, get_settings

    settings = get_settings(ctx)
    namespace = broker_namespace(settings)
    try:
        per_queue = counts(settings.redis_url, namespace, _queues(settings, queue))
        letters = [
            d for q, n in per_queue.items() if n for d in list_dead_letters(settings.redis_url, namespace, q)
        ]
    except DeadLettersUnavailable as e:
        fail(ctx, e, exitcodes.EXIT_TEMPFAIL)
    if as_json:
        click.echo(json.dumps({"counts": per_queue, "dead_letters": [d.as_json() for d in letters]}))
        return
    for q, n in per_queue.items():
        click.echo(f"{q}: {n} dead letter(s)" + (f" (key {xq_key(namespace, q)})" if n else ""))
    if letters:
        click.echo(f"{'QUEUE':<18} {'ID':<36} {'DIED':>6} {'ACCOUNT':>7} {'RETRIES':>7} ACTOR")
        for d in letters:
            click.echo(
                f"{d.queue:<18} {d.redis_id:<36} {format_age(d.died_at_ms):>6} {d.account_id or '-'!s:>7}"
                f" {d.retries if d.retries is not None else '-'!s:>7} {d.actor}"
            )
        click.echo("replay: kraite-mp dead-letters replay --all (or ID ...)")


@dead_letters.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter of the queue.")
@click.option("--queue", default=None, help="The queue (default: user_data_stream.queue_name).")
@click.pass_context
def replay_command(ctx: click.Context, ids: tuple[str, ...], replay_all: bool, queue: str | None) -> None:
    """Move dead letters back onto their queue with a fresh retry budget (frames are idempotent)."""
    from kraite_mp.messages import broker_namespace
    from kraite_mp.ops.cli import fail, get_settings

    if bool(ids) == replay_all:
        raise click.UsageError("give --all or one or more IDs (from `kraite-mp dead-letters list`)")
    settings = get_settings(ctx)
    queue = queue or settings.user_data_stream.queue_name
    try:
        done, missing = replay(
            settings.redis_url, broker_namespace(settings), queue, None if replay_all else list(ids)
        )
    except DeadLettersUnavailable as e:
        fail(ctx, e, exitcodes.EXIT_TEMPFAIL)
    click.echo(f"replayed {done} dead letter(s) onto {queue}")
    if missing:
        fail(ctx, f"not dead-lettered on {queue} (replayed or expired already): {', '.join(missing)}")
