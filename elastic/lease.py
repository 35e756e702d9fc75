"""One owner per run location: a lease a run takes on URI/lease/ before it writes anything else.

    URI/lease/00000003.json    {"token": 3, "owner": ..., "host": ..., "pid": ..., "renewed": ...}

The newest file is the lease; its number is the owner's fencing token. Taking the lease means
creating the next number with the store's own atomic create (O_EXCL on local disk, a conditional
put `If-None-Match: *` on S3): of two runs racing for it, exactly one succeeds. The owner rewrites
its own file every `renew_every_s`; a run that finds a live owner is refused (RunLockedError, exit
2) and touches nothing. A new run takes over at once when the owner released the lease, or is
provably dead (same host and boot, and its process is gone), and otherwise once the owner has not
renewed for `ttl_s`.

Fencing: a checkpoint commits only while its run's token is still the newest (`holds`), and the
manifest records the token, so a run that lost its location (frozen past the TTL, orphaned when
its driver was killed) can never commit over its successor.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from elastic import retry, storage
from elastic.errors import LeaseLostError, RunLockedError, StorageUnavailableError

LEASE_DIR = "lease"
TTL_S = 60.0
"""A lease not renewed for this long is expired: another run may take the location over."""
RENEW_EVERY_S = 10.0
"""The owner renews this often (well within TTL_S, so one or two failed renewals do not lose it)."""


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

    def describe(self) -> str:
        ago = time.time() - self.renewed
        return (f"run {self.name or '?'} (owner {self.owner[:8]}, pid {self.pid} on {self.host}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, renewed {ago:.0f}s ago)")


def this_process(name: str = "", ttl_s: float = TTL_S) -> LeaseRecord:
    now = time.time()
    return LeaseRecord(token=0, owner=uuid.uuid4().hex, host=socket.gethostname(), boot_id=_boot_id(),
                       pid=os.getpid(), pid_start=_pid_start(os.getpid()), started=now, renewed=now, ttl_s=ttl_s,
                       name=name)


class Lease:
    def __init__(self, uri: str, *, fs: Any = None, clock: Callable[[], float] = time.time):
        self.uri = storage.normalize_uri(uri)
        resolved, root = storage.resolve(self.uri)
        self.fs = fs if fs is not None else resolved
        self.dir = storage.join(root, LEASE_DIR)
        self.clock = clock

    # -- reading --------------------------------------------------------------------------
    def current(self) -> LeaseRecord | None:
        """The newest lease record (None: the location was never owned)."""
        tokens = self._tokens()
        if not tokens:
            return None
        return self._read(tokens[-1])

    def holds(self, token: int) -> bool:
        """This token is still the newest, unreleased and not expired (checked before a commit)."""
        cur = self.current()
        return (cur is not None and cur.token == token and not cur.released
                and self.clock() - cur.renewed <= cur.ttl_s)

    # -- taking, keeping, giving back -----------------------------------------------------
    def acquire(self, me: LeaseRecord, *, is_dead: Callable[[LeaseRecord], bool] | None = None) -> LeaseRecord:
        """Take the location for `me`: the record written (with its token), or RunLockedError
        naming the live owner (StorageUnavailableError when the location cannot be used at all)."""
        try:
            return self._acquire(me, is_dead)
        except OSError as exc:
            raise StorageUnavailableError(retry.redact(
                f"cannot write to {self.uri!r} ({type(exc).__name__}: {exc}): check the path, bucket and "
                "credentials")) from None

    def _acquire(self, me: LeaseRecord, is_dead: Callable[[LeaseRecord], bool] | None) -> LeaseRecord:
        cur = self.current()
        if cur is not None and not self._free(cur, is_dead):
            raise RunLockedError(
                f"{self.uri} is in use by {cur.describe()}: stop that run first, or wait until its lease "
                f"expires ({cur.ttl_s:g}s after it stopped renewing)")
        mine = replace(me, token=(cur.token if cur else 0) + 1, renewed=self.clock())
        if not self._create(mine):
            other = self.current()
            raise RunLockedError(f"{self.uri} was just taken by {other.describe() if other else 'another run'}")
        return mine

    def renew(self, rec: LeaseRecord) -> LeaseRecord:
        """Rewrite our record with a fresh `renewed`; LeaseLostError if another run took over."""
        newest = self._tokens()
        if newest and newest[-1] != rec.token:
            other = self._read(newest[-1])
            raise LeaseLostError(f"{self.uri} was taken over by {other.describe() if other else 'another run'}")
        rec = replace(rec, renewed=self.clock())
        self._write(rec)
        return rec

    def release(self, rec: LeaseRecord) -> None:
        """Give the location back (the next run takes over at once); a no-op if it is not ours."""
        newest = self._tokens()
        if newest and newest[-1] == rec.token:
            self._write(replace(rec, released=True, renewed=self.clock()))

    # -- mechanics ------------------------------------------------------------------------
    def _free(self, cur: LeaseRecord, is_dead: Callable[[LeaseRecord], bool] | None) -> bool:
        if cur.released or self.clock() - cur.renewed > cur.ttl_s:
            return True
        if cur.host == socket.gethostname() and cur.boot_id == _boot_id():
            return not pid_alive(cur.pid, cur.pid_start)  # its process is gone (or the pid was reused)
        return bool(is_dead and is_dead(cur))

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

        return retry.call(retry.STORAGE_LIST, ls, op="list leases", uri=self.uri)

    def _read(self, token: int) -> LeaseRecord | None:
        try:
            raw = retry.call(retry.STORAGE_READ, lambda: self.fs.cat_file(self._path(token)), op="read lease",
                             uri=self.uri)
            doc = json.loads(raw)
            return LeaseRecord(**{k: doc[k] for k in LeaseRecord.__dataclass_fields__ if k in doc})
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            # A torn or foreign file must not lock the location forever: it counts as expired.
            return LeaseRecord(token=token, owner="?", host="?", boot_id="?", pid=-1, pid_start="?", started=0.0,
                               renewed=0.0, name=f"unreadable lease ({exc})")

    def _create(self, rec: LeaseRecord) -> bool:
        """Create the record's file only if it does not exist: True if we created it."""
        data = json.dumps(asdict(rec)).encode()
        path = self._path(rec.token)

        def create() -> bool:
            try:
                if storage.is_local(self.fs):
                    os.makedirs(self.dir, exist_ok=True)
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    try:
                        os.write(fd, data)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    storage.fsync_dir(self.dir)
                elif "s3" in _protocols(self.fs):
                    self.fs.pipe_file(path, data, mode="create")  # PUT If-None-Match: *
                else:
                    # No atomic create known for this store: check, then write (documented race).
                    if self.fs.exists(path):
                        return False
                    self.fs.pipe_file(path, data)
                return True
            except FileExistsError:
                return False

        return retry.call(retry.STORAGE_WRITE, create, op="take lease", uri=self.uri)

    def _write(self, rec: LeaseRecord) -> None:
        data = json.dumps(asdict(rec)).encode()
        retry.call(retry.STORAGE_WRITE, lambda: storage.write_bytes(self.fs, self._path(rec.token), data),
                   op="renew lease", uri=self.uri)


class Renewer:
    """Keeps a lease renewed from a background thread until stopped; `lost` is set (and
    `on_lost(error)` called once) when another run took the location over."""

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
        while not self._stop.wait(self.every_s):
            try:
                self.rec = self.lease.renew(self.rec)
            except LeaseLostError as exc:
                self.lost.set()
                if self.on_lost is not None:
                    self.on_lost(str(exc))
                return
            except Exception:  # noqa: BLE001 - storage hiccup: try again at the next interval
                continue

    def stop(self, *, release: bool) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if release and not self.lost.is_set():
            try:
                self.lease.release(self.rec)
            except Exception:  # noqa: BLE001 - it expires on its own
                pass


def _protocols(fs: Any) -> tuple[str, ...]:
    inner = getattr(fs, "inner_fs", fs)
    proto = inner.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


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
