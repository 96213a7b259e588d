"""Fleet ownership: several supervisors (hosts) share the accounts through Redis.

- **Membership**: every supervisor adds its ``supervisor.host_id`` to the sorted set
  ``<ns>:fleet:members`` with its expiry time as score, renewed every ``step``; members whose expiry
  passed are removed by whoever looks next. A host that stops renewing (dead, partitioned) leaves the
  set ``lease_s`` later.
- **Assignment**: each account goes to the live member with the highest rendezvous weight
  (``blake2b(host, account)``): a member that leaves moves only its own accounts, a member that joins
  takes only its share.
- **Leases**: a supervisor streams an account only while it holds the account's lease, a redis-py
  ``Lock`` (``<ns>:fleet:lease:account:<id>``, token ``<host_id>:<random>``, TTL ``lease_s``), renewed
  each step by the Lock's own check-and-extend (``Lock.reacquire``: extend only while the key still
  holds our token), done for every held lease in one script call (``RENEW_ALL_LUA``), so that a host's
  Redis commands per step do not grow with its accounts. A lease held by another live member is never
  taken; one of a dead member expires by itself.
- **Handover without a gap**: when an account's assignment moves to another live member (one that
  joined or came back), the new owner streams it while the old one still holds the lease (an overlap);
  the old one releases the lease once the new owner's stream reports ``streaming`` in a status written
  since the handover began (``<ns>:status:<host>:user-data-<id>``; an entry from before a partition is
  stale), and keeps streaming until then (a warning after ``fleet.handover_timeout_s``); the new owner
  then takes the lease. Frames received on both are one frame (ids from content), audited once.
- **Mark-price**: exactly one writer per fleet, the holder of ``<ns>:fleet:lease:mark-price``, among the
  supervisors with ``supervisor.mark_price`` ("may lead").
- **Redis unreachable**: a step that fails changes nothing: what is owned keeps streaming (frames spool),
  nothing new is taken. A lease found owned by another member when Redis answers again is given up and
  its stream stopped.

The parent holds no socket across a fork: each step opens a short-lived Redis client and closes it.
A quiet step costs 6 commands whatever the number of leases (membership 3, the renewal script 1, the
member's info 1, and the new connection's CLIENT SETINFO); a lease wanted costs 2 more, a handover 1
per account. bench/fleet_leases.py measures it (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kraite_mp.logs import describe_error

if TYPE_CHECKING:
    import redis

    from kraite_mp.config import Settings

log = logging.getLogger(__name__)

#: ``Lock.reacquire`` of redis-py (extend a lease only while it holds our token) for every held lease at
#: once: KEYS the lease keys, ARGV[1] the TTL (ms), ARGV[1 + i] the token of KEYS[i]; 1/0 per lease.
#: Single-instance Redis (the keys may sit in different cluster slots).
RENEW_ALL_LUA = """
local renewed = {}
for i, key in ipairs(KEYS) do
    local token = redis.call('get', key)
    if token and token == ARGV[i + 1] then
        redis.call('pexpire', key, ARGV[1])
        renewed[i] = 1
    else
        renewed[i] = 0
    end
end
return renewed
"""

#: Redis socket timeouts of a step: a hung Redis must not hold up the supervisor's loop for long.
FLEET_SOCKET_TIMEOUT_S = 1.0
MARK_PRICE = "mark-price"


def members_key(namespace: str) -> str:
    return f"{namespace}:fleet:members"


def info_key(namespace: str, host_id: str) -> str:
    return f"{namespace}:fleet:info:{host_id}"


def lease_key(namespace: str, what: int | str) -> str:
    """The lease of an account (by id) or of ``MARK_PRICE``."""
    return f"{namespace}:fleet:lease:{'account:' if isinstance(what, int) else ''}{what}"


def weight(host_id: str, account_id: int) -> int:
    """Rendezvous (highest random weight) score of ``host_id`` for ``account_id``."""
    digest = hashlib.blake2b(f"{host_id}\0{account_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(members: Iterable[str], account_id: int) -> str | None:
    """The live member an account belongs to (None without members)."""
    return max(members, key=lambda h: (weight(h, account_id), h), default=None)


def holder_of(token: Any) -> str | None:
    """The host id in a lease token ``<host_id>:<random>``."""
    if isinstance(token, bytes):
        token = token.decode("utf-8", "replace")
    if not isinstance(token, str) or ":" not in token:
        return None
    return token.rsplit(":", 1)[0]


@dataclass
class FleetView:
    """What one step decided (and saw), for the arbiter and ``kraite-mp fleet``."""

    #: Accounts this supervisor streams now: leases held, plus handovers to it that wait for a lease.
    owned: set[int] = field(default_factory=set)
    leases: set[int] = field(default_factory=set)
    lead_mark_price: bool = False
    members: list[str] = field(default_factory=list)
    #: The step reached Redis (False: nothing changed).
    ok: bool = True


class FleetOwnership:
    """This supervisor's side of the fleet protocol (see the module doc); ``step`` is called by the arbiter."""

    def __init__(self, settings: Settings, host_id: str) -> None:
        self.settings = settings
        self.host_id = host_id
        self.namespace = settings.redis_namespace
        self.lease_s = settings.fleet.failover_s * 2 / 3
        self.step_s = settings.fleet.failover_s / 6
        self._run = os.urandom(6).hex()
        #: account id (or MARK_PRICE) -> lease token, of the leases held
        self.tokens: dict[int | str, str] = {}
        #: account id -> monotonic (and wall) time its handover to another member began
        self.handing_over: dict[int, float] = {}
        self._handover_wall: dict[int, float] = {}
        self._handover_warned: set[int] = set()
        self.view = FleetView(ok=False)
        self.next_step_at = 0.0
        self._failing_since: float | None = None
        # the batch renewal and redis-py's Lock release script, registered once; run through each step's client
        self._scripts: tuple[Any, Any] | None = None
        #: The first step only registers: supervisors started together see each other before taking
        #: leases (else the first would take everything and hand it over again).
        self._registered = False

    # -- the step --------------------------------------------------------------------------------
    def step(self, account_ids: Iterable[int], streaming: set[int], *, may_lead: bool) -> FleetView:
        """One round: renew membership and leases, take what is assigned and free, hand over what moved.

        ``streaming``: accounts whose stream runs here now (a child alive). Never raises: a Redis failure
        returns the previous view with ``ok=False``."""
        self.next_step_at = time.monotonic() + self.step_s
        client = self._client()
        try:
            view = self._step(client, sorted(set(account_ids)), streaming, may_lead)
        except Exception as e:  # noqa: BLE001 - Redis down or refusing: keep what is owned, take nothing
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
                log.warning(
                    "fleet: Redis unreachable (%s): keeping the %d account(s) owned, taking nothing new",
                    describe_error(e),
                    len(self.view.owned),
                )
            self.view.ok = False
            return self.view
        finally:
            client.close()
        if self._failing_since is not None:
            log.info("fleet: Redis reachable again after %.0fs", time.monotonic() - self._failing_since)
            self._failing_since = None
        self.view = view
        return view

    def _client(self) -> redis.Redis:
        import redis

        from kraite_mp.messages import redis_driver_info

        return redis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=FLEET_SOCKET_TIMEOUT_S,
            socket_connect_timeout=FLEET_SOCKET_TIMEOUT_S,
            retry_on_timeout=False,
            driver_info=redis_driver_info(),
        )

    def _lock_scripts(self, client: redis.Redis) -> tuple[Any, Any]:
        from redis.lock import Lock

        if self._scripts is None:
            lock = Lock(client, "unused", timeout=1.0)
            lock.register_scripts()
            self._scripts = (client.register_script(RENEW_ALL_LUA), Lock.lua_release)
        return self._scripts

    def _step(
        self, client: redis.Redis, account_ids: list[int], streaming: set[int], may_lead: bool
    ) -> FleetView:
        renew_all, release = self._lock_scripts(client)
        ttl_ms = int(self.lease_s * 1000)
        now_ms = int(time.time() * 1000)
        mkey = members_key(self.namespace)
        # 1. membership, and the renewal of every lease held (redis-py Lock's reacquire script)
        held = list(self.tokens.items())
        pipe = client.pipeline(transaction=False)
        pipe.zadd(mkey, {self.host_id: now_ms + ttl_ms})
        pipe.zremrangebyscore(mkey, "-inf", now_ms)
        pipe.zrange(mkey, 0, -1)
        if held:
            renew_all(
                keys=[lease_key(self.namespace, what) for what, _ in held],
                args=[ttl_ms, *(token for _, token in held)],
                client=pipe,
            )
        results = pipe.execute()
        members = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in results[2])
        for (what, _token), renewed in zip(held, results[3] if held else [], strict=True):
            if not renewed:
                self.tokens.pop(what, None)
                if isinstance(what, int):
                    self.handing_over.pop(what, None)
                log.warning("fleet: the lease of %s was lost (another member holds it now)", _label(what))
        if not self._registered:
            self._registered = True
            log.info("fleet: joined as %s; %d member(s): %s", self.host_id, len(members), ", ".join(members))
            return FleetView(members=members)
        live = set(members)
        mine = {a for a in account_ids if assign(members, a) == self.host_id}
        wanted: list[int | str] = [a for a in sorted(mine) if a not in self.tokens]
        if may_lead and MARK_PRICE not in self.tokens:
            wanted.append(MARK_PRICE)
        elif not may_lead and MARK_PRICE in self.tokens:
            self._release(client, release, MARK_PRICE)
        # 2. take the leases assigned here that are free; learn who holds the others
        overlap: set[int] = set()
        if wanted:
            pipe = client.pipeline(transaction=False)
            tokens = {what: f"{self.host_id}:{self._run}{os.urandom(4).hex()}" for what in wanted}
            for what in wanted:
                pipe.set(lease_key(self.namespace, what), tokens[what], nx=True, px=ttl_ms)
                pipe.get(lease_key(self.namespace, what))
            answers = pipe.execute()
            for i, what in enumerate(wanted):
                taken, current = answers[2 * i], answers[2 * i + 1]
                if taken:
                    self.tokens[what] = tokens[what]
                    log.info("fleet: took the lease of %s", _label(what))
                elif isinstance(what, int) and holder_of(current) in live:
                    overlap.add(what)  # moving here from a live member: stream now, the lease follows
        # 3. leases held of accounts assigned elsewhere now: hand over once the new owner streams
        moved = [a for a in self.tokens if isinstance(a, int) and a not in mine]
        if moved:
            self._hand_over(client, release, moved, members, account_ids)
        for a in list(self.handing_over):
            if a not in self.tokens:
                self.handing_over.pop(a, None)
                self._handover_wall.pop(a, None)
                self._handover_warned.discard(a)
        leases = {a for a in self.tokens if isinstance(a, int)}
        view = FleetView(
            owned=leases | (overlap & set(account_ids)),
            leases=leases,
            lead_mark_price=MARK_PRICE in self.tokens,
            members=members,
        )
        client.set(
            info_key(self.namespace, self.host_id),
            json.dumps(
                {
                    "host_id": self.host_id,
                    "accounts": len(view.owned),
                    "leases": len(leases),
                    "handing_over": len(self.handing_over),
                    "mark_price": view.lead_mark_price,
                    "ts": now_ms / 1000,
                }
            ),
            px=ttl_ms * 3,
        )
        return view

    def _hand_over(
        self, client: redis.Redis, release: Any, moved: list[int], members: list[str], account_ids: list[int]
    ) -> None:
        from kraite_mp.supervisor.publish import status_key
        from kraite_mp.supervisor.runfiles import ROLE_USER_DATA, child_key

        now = time.monotonic()
        known = set(account_ids)
        keys = []
        for a in moved:
            if a not in self.handing_over:
                self.handing_over[a] = now
                self._handover_wall[a] = time.time()
            owner = assign(members, a)
            keys.append(status_key(self.namespace, owner or "-", child_key(ROLE_USER_DATA, a)))
        states: list[Any] = client.mget(keys) if keys else []  # type: ignore[assignment]  # sync client
        for a, raw in zip(moved, states, strict=True):
            started, started_wall = self.handing_over[a], self._handover_wall[a]
            # only a status written since the handover began counts: one from before a partition is stale
            streaming_there = _streaming_since(raw, started_wall)
            if a not in known or streaming_there:
                why = "account gone" if a not in known else "its new owner streams it"
                self._release(client, release, a)
                log.info("fleet: handed account %d over (%s)", a, why)
            elif now - started >= self.settings.fleet.handover_timeout_s and a not in self._handover_warned:
                self._handover_warned.add(a)
                log.warning(
                    "fleet: account %d moves to %s, which does not stream it after %.0fs; streaming it here"
                    " until it does",
                    a,
                    assign(members, a),
                    now - started,
                )

    def _release(self, client: redis.Redis, release: Any, what: int | str) -> None:
        token = self.tokens.pop(what, None)
        if isinstance(what, int):
            self.handing_over.pop(what, None)
            self._handover_wall.pop(what, None)
            self._handover_warned.discard(what)
        if token is not None:
            release(keys=[lease_key(self.namespace, what)], args=[token], client=client)

    def release_all(self) -> None:
        """At a graceful shutdown, after the children stopped: free every lease for the next owner now."""
        if not self.tokens:
            return
        client = self._client()
        try:
            _renew_all, release = self._lock_scripts(client)
            for what in list(self.tokens):
                self._release(client, release, what)
            client.zrem(members_key(self.namespace), self.host_id)
            client.delete(info_key(self.namespace, self.host_id))
            log.info("fleet: released every lease and left the fleet")
        except Exception as e:  # noqa: BLE001 - they expire on their own
            log.warning(
                "fleet: cannot release the leases (%s): they expire in %.0fs", describe_error(e), self.lease_s
            )
        finally:
            client.close()


def _label(what: int | str) -> str:
    return f"account {what}" if isinstance(what, int) else str(what)


def _streaming_since(raw: Any, since_wall: float) -> bool:
    """A status entry that says ``streaming`` and was written at or after ``since_wall``."""
    if raw is None:
        return False
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        return False
    if not isinstance(data, dict) or data.get("state") != "streaming":
        return False
    ts = data.get("ts")
    return isinstance(ts, int | float) and ts >= since_wall


def fleet_members(client: redis.Redis, namespace: str) -> list[dict[str, Any]]:
    """Live members with what they last said (``kraite-mp fleet``), and each one's expiry."""
    now_ms = int(time.time() * 1000)
    rows: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]  # sync client
        members_key(namespace), now_ms, "+inf", withscores=True
    )
    out = []
    for member, expires in rows:
        host = member.decode() if isinstance(member, bytes) else str(member)
        raw: Any = client.get(info_key(namespace, host))
        info = json.loads(raw) if raw else {}
        info["host_id"] = host
        info["expires_in_s"] = round((float(expires) - now_ms) / 1000, 1)
        out.append(info)
    return out


def host_id_of(settings: Settings) -> str:
    from kraite_mp.supervisor.publish import host_name

    return settings.supervisor.host_id or host_name()
