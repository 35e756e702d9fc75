"""Unit: one vocabulary of events, used by the log, the CLI, progress and the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from elastic._internal.events import Event, EventLog, format_event, live_members, markdown, read_events

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_lists_exactly_the_declared_events():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- events -->\n(.*?)\n<!-- /events -->", readme, re.S)
    assert block, "README.md lost its events block"
    assert block.group(1) == markdown(), "README events differ from elastic/_internal/events.py: paste events.markdown()"


def test_every_event_the_code_emits_is_declared():
    """Names passed to emit() anywhere in the package are members of Event, never free strings."""
    free = []
    for path in (ROOT / "elastic").rglob("*.py"):
        for m in re.finditer(r"\bemit(?:_worker)?\(\s*\"([a-z_]+)\"", path.read_text()):
            free.append(f"{path.relative_to(ROOT)}: {m.group(1)}")
    assert not free, f"emit with a free string: {free}"


def test_log_round_trip_and_torn_last_line(tmp_path):
    log = EventLog(f"file://{tmp_path}")
    log.emit(Event.RUN_STARTED, name="x", uri="file:///x")
    log.emit(Event.GROUP_BUILT, generation=0, world_size=2, members=[{"worker": 0, "rank": 0, "pid": 1},
                                                                      {"worker": 1, "rank": 1, "pid": 2}])
    log.emit(Event.WORKER_FAILED, worker=1, rank=1, pid=2)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"event": "run_fin')  # being written right now
    events = read_events(f"file://{tmp_path}")
    assert [e["event"] for e in events] == ["run_started", "group_built", "worker_failed"]
    assert json.loads((tmp_path / "events.jsonl").read_text().splitlines()[0])["event"] == "run_started"
    assert live_members(events) == (0, [{"worker": 0, "rank": 0, "pid": 1}])


def test_brief_and_full_formats():
    ev = {"event": "group_built", "time": 0.0, "generation": 1, "members": [{"pid": 7}], "uri": "s3://b/r",
          "error": "Traceback\n  ...\nValueError: bad"}
    brief = format_event(ev, brief=True)
    assert brief.startswith("[elastic ") and "pids=[7]" in brief and "uri" not in brief and "ValueError: bad" in brief
    full = format_event(ev)
    assert "  group_built  generation=1" in full and "uri=s3://b/r" in full


def test_storage_refusing_the_log_never_stops_the_run_and_nothing_is_lost():
    import fsspec

    from elastic._internal.checkpoint.faulty_fs import Fault, FaultyFileSystem

    uri = "memory://events-outage"
    inner = fsspec.filesystem("memory")
    # An object store (no append) that refuses the first four writes: one 5xx outage.
    log = EventLog(uri, fs=FaultyFileSystem(fs=inner, faults=[Fault("pipe", kind="permanent", times=4)]),
                   flush_interval_s=0.0, append=False)
    for i in range(6):
        log.emit(Event.RESTORED, step=i, source="memory")  # never raises
    log.close()
    assert log.write_errors >= 1
    assert [e["step"] for e in read_events(uri)] == list(range(6))


def test_object_store_flushes_rewrite_only_the_open_segment(monkeypatch):
    """The cost of a flush must not grow with the run: past SEGMENT_LINES a new segment starts."""
    import fsspec

    from elastic._internal import jsonlog

    monkeypatch.setattr(jsonlog, "SEGMENT_LINES", 10)
    uri = "memory://events-segments"
    log = EventLog(uri, fs=fsspec.filesystem("memory"), flush_interval_s=0.0, append=False)  # like S3
    for i in range(35):
        log.emit(Event.RESTORED, step=i, source="memory")
    log.close()
    segments = sorted(fsspec.filesystem("memory").ls("/events-segments/events", detail=False))
    assert len(segments) == 4 and [e["step"] for e in read_events(uri)] == list(range(35))
    assert log.since(30) == log.events[30:] and len(log.since(0)) == 35


def test_credentials_never_reach_the_log():
    uri = "memory://events-secrets"
    log = EventLog(uri)
    log.emit(Event.RUN_STARTED, uri="s3://AKIDUSER:topsecret@bucket/run", name="x")
    log.emit(Event.CHECKPOINT_FAILED, step=3, reason="put https://b.s3/x?X-Amz-Signature=abc123&y=1 failed")
    text = "\n".join(ev_line for ev_line in __import__("elastic._internal.events", fromlist=["read_lines"]).read_lines(uri))
    assert "topsecret" not in text and "abc123" not in text and "***" in text
    assert "topsecret" not in json.dumps(log.events)
