"""Which entry files this user started runs with on this machine.

`URI/run.json` lives with the run's data: anyone who can write the run's location can name any
`.py` there, with a matching SHA-256. So `elastic resume URI` runs the entry point named in run.json
only when this user started a run with that very file (same path, same SHA-256) on this machine,
as recorded here when the run was started; otherwise it asks for `--entrypoint` (or
`--trust-entrypoint`).

    $ELASTIC_HOME/trusted_entrypoints.jsonl    (default ~/.elastic) {"entrypoint", "sha256", "time"} a line

The record is only believed when this user owns it and nobody else can write it.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

FILE = "trusted_entrypoints.jsonl"


def _path() -> Path:
    return Path(os.environ.get("ELASTIC_HOME") or Path.home() / ".elastic") / FILE


def remember(entrypoint: str, sha256: str) -> None:
    """Record that this user starts a run with `entrypoint` (absolute 'FILE.py:FN') at `sha256`.
    Best effort: a home that cannot be written only means resume asks for --entrypoint."""
    if is_trusted(entrypoint, sha256):
        return
    path = _path()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps({"entrypoint": entrypoint, "sha256": sha256, "time": time.time()}) + "\n")
    except OSError:
        pass


def is_trusted(entrypoint: str, sha256: str) -> bool:
    """This user started a run with exactly this file (path and content) on this machine."""
    path = _path()
    try:
        st = path.stat()
        if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        lines = path.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("entrypoint") == entrypoint and doc.get("sha256") == sha256:
            return True
    return False
