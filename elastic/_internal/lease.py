"""One owner per run location: a lease a run takes on URI/lease/ before it writes anything else.

    URI/lease/00000003.json    {"token": 3, "owner": ..., "host": ..., "pid": ..., "seq": ...}

The newest file is the lease; its number is the owner's fencing token. Taking the lease means
creating the next number with the store's own atomic create (storage.create_bytes: a link that
fails if the name exists on local disk, a conditional put `If-None-Match: *` on S3) and reading it
back: of two runs racing for it, exactly one succeeds. Stores without a tested atomic create
(gs://, az://, hdfs, ...) are refused unless ELASTIC_ALLOW_UNSAFE_LOCATION=1. The owner rewrites its
own file every `renew_every_s` (`seq` counts renewals); a run that finds a live owner is refused
(RunLockedError, exit 2) and touches nothing.

Expiry never compares clocks across hosts: a reader measures a record's age on its own monotonic
clock, from when it saw the record change. A new run takes over at once when the owner released
the lease or is provably dead (same host, boot and PID namespace, and its process is gone; or Ray's
GCS, when this process is connected to the owner's cluster, says the owner's node is dead). A live
owner elsewhere is recognised as soon as one of its renewals is seen; an owner that cannot be
checked is taken over once its record has not changed for `ttl_s`, watched from here.

Fencing: a checkpoint commits only while its run's token (and owner) is still the newest and
alive (`check`), and the manifest records the token (elastic._internal.checkpoint), so a run that lost its
location (frozen past the TTL, orphaned when its driver was killed) can never commit over its
successor. A renewal that fails for good (permanent storage error) marks the lease lost: commits
then refuse, with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from elastic._internal import retry, storage
from elastic.errors import LeaseLostError, RunLockedError, StorageUnavailableError

log = logging.getLogger(__name__)

LEASE_DIR = "lease"
TTL_S = 60.0
"""A lease not renewed for this long is expired: another run may take the location over."""
RENEW_EVERY_S = 10.0
"""The owner renews this often (well within TTL_S, so one or two failed renewals do not lose it)."""
POLL_S = 1.0
"""How often a new run re-reads an owner it cannot check while it waits for a renewal or expiry."""


@dataclass(frozen=True)
class LeaseRecord:
    token: int
    owner: str
    """A fresh id per run (uuid4)."""
    host: str
    boot_id: str
    pid: int
    """The driver's process (the `elastic run` process, or the script that called fit())."""
    pid_start: str
    """The process's start time (so a reused pid is not mistaken for the owner)."""
    started: float
    renewed: float
    ttl_s: float = TTL_S
    released: bool = False
    name: str = ""
    seq: int = 0
    """Renewals so far: every renewal changes the record, which is what readers watch."""
    pid_ns: str = ""
    """The driver's PID namespace (/proc/self/ns/pid): its pid means something only inside it."""
    ray_node: str = ""
    """The Ray node of the driver and its cluster's GCS address, once the driver joined Ray."""
    ray_gcs: str = ""

    def describe(self) -> str:
        ago = time.time() - self.renewed
        return (f"run {self.name or '?'} (owner {self.owner[:8]}, pid {self.pid} on {self.host}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, renewed {ago:.0f}s ago)")


def this_process(name: str = "", ttl_s: float = TTL_S) -> LeaseRecord:
    now = time.time()
    return LeaseRecord(token=0, owner=uuid.uuid4().hex, host=socket.gethostname(), boot_id=_boot_id(),
                       pid=os.getpid(), pid_start=_pid_start(os.getpid()), started=now, renewed=now, ttl_s=ttl_s,
                       name=name, pid_ns=_pid_ns(), **_ray_identity())


class Lease:
    """The lease of one location. `clock` is monotonic (ages are measured here, never from another
    host's clock); `sleep` is what acquire() waits with. One object remembers what it has seen."""

    def __init__(self, where: str | storage.RunLocation, *, fs: Any = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        """`where`: the run's location or its URI; `fs` replaces its filesystem (fault injection)."""
        location = storage.RunLocation.of(where)
        self.uri = location.uri
        self.fs = fs if fs is not None else location.fs
        self.dir = location.path(LEASE_DIR)
        self.clock, self.sleep = clock, sleep
        self.lost_reason: str | None = None
        """Set (by Renewer) when the lease can no longer be kept: every check() then fails with it."""
        self._seen: dict[int, tuple[LeaseRecord, float, bool]] = {}  # token: (record, seen at, changed since)

    # -- reading --------------------------------------------------------------------------
    def current(self) -> LeaseRecord | None:
        """The newest lease record (None: the location was never owned)."""
        tokens = self._tokens()
        if not tokens:
            return None
        return self._read(tokens[-1])

    def check(self, token: int, owner: str = "") -> str | None:
        """Why `token` (of `owner`, when given) no longer holds the location, or None while it
        does: the newest token, that owner's, unreleased, and seen renewed within its TTL here."""
        if self.lost_reason:
            return self.lost_reason
        cur = self.current()
        if cur is None or cur.token != token:
            return f"{self.uri} was taken over by {cur.describe() if cur else 'nobody (its lease is gone)'}"
        if owner and cur.owner != owner:
            return f"{self.uri} lease {token} belongs to another run, {cur.describe()}"
        if cur.released:
            return f"{self.uri} lease {token} was released"
        age, _ = self._observe(cur)
        if age > cur.ttl_s:
            return f"{self.uri} lease {token} was not renewed for {age:.0f}s (TTL {cur.ttl_s:g}s)"
        return None

    def holds(self, token: int, owner: str = "") -> bool:
        """check() found nothing wrong (checked before a commit)."""
        return self.check(token, owner) is None

    def _observe(self, rec: LeaseRecord) -> tuple[float, bool]:
        """(seconds on our clock since we saw `rec` change, whether we saw it change at all)."""
        now = self.clock()
        seen = self._seen.get(rec.token)
        if seen is None or seen[0] != rec:
            self._seen[rec.token] = (rec, now, seen is not None)
            return 0.0, seen is not None
        return now - seen[1], seen[2]

    # -- taking, keeping, giving back -----------------------------------------------------
    def acquire(self, me: LeaseRecord, *, is_dead: Callable[[LeaseRecord], bool] | None = None) -> LeaseRecord:
        """Take the location for `me`: the record written (with its token), or RunLockedError
        naming the live owner (StorageUnavailableError when the location cannot be used at all,
        ConfigError on a store where ownership cannot be made safe). Waits (up to the owner's TTL)
        only for an owner it cannot check. `is_dead` adds a liveness check (default: Ray's GCS)."""
        storage.require_atomic_create(self.fs, self.uri)
        try:
            return self._acquire(me, is_dead or ray_owner_dead)
        except OSError as exc:
            raise StorageUnavailableError(retry.redact(
                f"cannot write to {self.uri!r} ({type(exc).__name__}: {exc}): check the path, bucket and "
                "credentials")) from None

    def _acquire(self, me: LeaseRecord, is_dead: Callable[[LeaseRecord], bool]) -> LeaseRecord:
        waiting = False
        while True:
            cur = self.current()
            state = "free" if cur is None else self._state(cur, is_dead)
            if state == "free":
                break
            assert cur is not None
            if state == "live":
                raise RunLockedError(
                    f"{self.uri} is in use by {cur.describe()}: stop that run first, or wait until its lease "
                    f"expires ({cur.ttl_s:g}s after it stopped renewing)")
            if not waiting:
                waiting = True
                log.warning("%s is owned by %s, which cannot be checked from here: waiting up to %gs for it "
                            "to renew (then this run is refused) or to expire", self.uri, cur.describe(), cur.ttl_s)
            self.sleep(POLL_S)
        t0 = self.clock()
        mine = replace(me, token=(cur.token if cur else 0) + 1, seq=0, renewed=time.time())
        created = self._create(mine)
        back = self._read(mine.token)  # a retried create may have succeeded the first time
        if not created and (back is None or back.owner != mine.owner):
            raise RunLockedError(f"{self.uri} was just taken by {back.describe() if back else 'another run'}")
        if back is None or back.owner != mine.owner:
            raise RunLockedError(f"{self.uri} was taken at the same time by {back.describe() if back else '?'}: "
                                 "this store let two runs create the same lease")
        self._seen[mine.token] = (back, t0, True)
        return mine

    def _state(self, cur: LeaseRecord, is_dead: Callable[[LeaseRecord], bool]) -> str:
        """"free", "live", or "unknown" (an owner we cannot check, not yet seen to renew or expire)."""
        if cur.released:
            return "free"
        if same_pid_space(cur):
            return "free" if not pid_alive(cur.pid, cur.pid_start) else "live"
        if is_dead(cur):
            return "free"
        age, changed = self._observe(cur)
        if changed:
            return "live"
        return "free" if age > cur.ttl_s else "unknown"

    def renew(self, rec: LeaseRecord) -> LeaseRecord:
        """Rewrite our record (seq + 1); LeaseLostError if it is no longer ours."""
        t0 = self.clock()
        cur = self.current()
        if cur is None or cur.token != rec.token or cur.owner != rec.owner:
            raise LeaseLostError(f"{self.uri} was taken over by {cur.describe() if cur else 'another run'}")
        rec = replace(rec, seq=max(rec.seq, cur.seq) + 1, renewed=time.time(), **_ray_identity(rec))
        self._write(rec)
        self._seen[rec.token] = (rec, t0, True)
        return rec

    def release(self, rec: LeaseRecord) -> None:
        """Give the location back (the next run takes over at once); a no-op if it is not ours."""
        cur = self.current()
        if cur is not None and cur.token == rec.token and cur.owner == rec.owner:
            self._write(replace(rec, released=True, seq=max(rec.seq, cur.seq) + 1, renewed=time.time()))

    # -- mechanics ------------------------------------------------------------------------
    def _path(self, token: int) -> str:
        return storage.join(self.dir, f"{token:08d}.json")

    def _tokens(self) -> list[int]:
        def ls() -> list[int]:
            self.fs.invalidate_cache(self.dir)
            try:
                names = self.fs.ls(self.dir, detail=False)
            except FileNotFoundError:
                return []
            out = []
            for n in names:
                base = n.rstrip("/").rsplit("/", 1)[-1]
                if base.endswith(".json") and base[:-5].isdigit():
                    out.append(int(base[:-5]))
            return sorted(out)

        return retry.call(retry.LEASE, ls, op="list leases", uri=self.uri)

    def _read(self, token: int) -> LeaseRecord | None:
        try:
            raw = retry.call(retry.LEASE, lambda: self.fs.cat_file(self._path(token)), op="read lease",
                             uri=self.uri)
            doc = json.loads(raw)
            return LeaseRecord(**{k: doc[k] for k in LeaseRecord.__dataclass_fields__ if k in doc})
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            # A torn or foreign file must not lock the location forever: it counts as released.
            return LeaseRecord(token=token, owner="?", host="?", boot_id="?", pid=-1, pid_start="?", started=0.0,
                               renewed=0.0, released=True, name=f"unreadable lease ({exc})")

    def _create(self, rec: LeaseRecord) -> bool:
        """Create the record's file only if it does not exist: True if we created it."""
        data = json.dumps(asdict(rec)).encode()
        return retry.call(retry.LEASE, lambda: storage.create_bytes(self.fs, self._path(rec.token), data),
                          op="take lease", uri=self.uri)

    def _write(self, rec: LeaseRecord) -> None:
        data = json.dumps(asdict(rec)).encode()
        retry.call(retry.LEASE, lambda: storage.write_bytes(self.fs, self._path(rec.token), data),
                   op="renew lease", uri=self.uri)


class Renewer:
    """Keeps a lease renewed from a background thread until stopped. The lease is lost (`lost`
    set, `lease.lost_reason` says why, `on_lost(reason)` called once) when another run took the
    location over, when storage refuses a renewal for good (a permanent error: expired credentials,
    permission denied), or when transient errors kept it from renewing for the whole TTL."""

    def __init__(self, lease: Lease, rec: LeaseRecord, *, every_s: float = RENEW_EVERY_S,
                 on_lost: Callable[[str], None] | None = None):
        self.lease, self.rec, self.every_s, self.on_lost = lease, rec, every_s, on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="elastic-lease", daemon=True)

    def start(self) -> "Renewer":
        self._thread.start()
        return self

    def _run(self) -> None:
        last_ok = self.lease.clock()
        while not self._stop.wait(self.every_s):
            t0 = self.lease.clock()
            try:
                self.rec = self.lease.renew(self.rec)
                last_ok = t0
                continue
            except LeaseLostError as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - classified below
                error = retry.redact(f"{type(exc).__name__}: {exc}")
                if retry.is_permanent(exc):
                    reason = (f"{self.lease.uri}: storage refuses to renew this run's lease ({error}): fix the "
                              "credentials or permissions, then resume")
                elif self.lease.clock() - last_ok > self.rec.ttl_s:
                    reason = (f"{self.lease.uri}: this run's lease could not be renewed for {self.rec.ttl_s:g}s "
                              f"(last error: {error}): resume once the storage is reachable")
                else:
                    log.warning("lease renewal of %s failed, retrying: %s", self.lease.uri, error)
                    continue
            self._lose(reason)
            return

    def _lose(self, reason: str) -> None:
        self.lease.lost_reason = reason
        self.lost.set()
        log.error("%s", reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    def stop(self, *, release: bool) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if release and not self.lost.is_set():
            try:
                self.lease.release(self.rec)
            except Exception:  # noqa: BLE001 - it expires on its own
                pass


def same_pid_space(rec: LeaseRecord) -> bool:
    """The record's pid means the same process here: same host, boot and PID namespace."""
    return (rec.host == socket.gethostname() and bool(rec.boot_id) and rec.boot_id == _boot_id()
            and bool(rec.pid_ns) and rec.pid_ns == _pid_ns())


def ray_owner_dead(rec: LeaseRecord) -> bool:
    """Ray's GCS says the owner's node is dead. Only answers True when this process is connected
    to the owner's cluster and the node is known there; anything else is "cannot tell"."""
    if not rec.ray_node or "ray" not in sys.modules:
        return False
    ray = sys.modules["ray"]
    try:
        if not ray.is_initialized() or ray.get_runtime_context().gcs_address != rec.ray_gcs:
            return False
        return any(n.get("NodeID") == rec.ray_node and not n.get("Alive") for n in ray.nodes())
    except Exception:  # noqa: BLE001 - the GCS is unreachable: cannot tell
        return False


def _ray_identity(rec: LeaseRecord | None = None) -> dict[str, str]:
    """ray_node/ray_gcs of this process when it is connected to Ray (else the record's, or none)."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ctx = ray.get_runtime_context()
            return {"ray_node": ctx.get_node_id(), "ray_gcs": ctx.gcs_address}
    except Exception:  # noqa: BLE001 - not connected after all
        pass
    return {"ray_node": rec.ray_node, "ray_gcs": rec.ray_gcs} if rec is not None else {}


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_alive(pid: int, start: str) -> bool:
    """The process `pid` that started at `start` still runs (a reused pid does not count)."""
    if not os.path.isdir("/proc"):  # no start times to compare: existence is all we can tell
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    got = _pid_start(pid)
    return bool(got) and (got == start or not start)


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' when it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return "" if fields[0] == "Z" else fields[19]
    except (OSError, IndexError):
        return ""
