"""The README's main job: trains the digits CNN on 2 workers and reaches >= 0.9 held-out accuracy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_demo_trains_to_90_percent(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "scripts/demo_digits.py", "--checkpoint-uri", str(tmp_path / "digits")],
                       capture_output=True, text=True, timeout=170, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"demo: held-out accuracy ([0-9.]+)", p.stdout)
    assert m and float(m.group(1)) >= 0.9, p.stdout[-3000:]
    assert "world_size=2" in p.stdout and "checkpoint_committed" in p.stdout  # progress a person can follow
    assert "finished: 300 steps" in p.stdout
    assert elapsed < 120


@pytest.mark.slow  # ~60 s; the sharded path itself is covered by test_fsdp
@pytest.mark.timeout(300)
def test_sharded_lm_demo_learns(tmp_path):
    """The README's sharded example (FSDP2, text of the standard library) runs and learns."""
    p = subprocess.run([sys.executable, "scripts/demo_lm.py", "--steps", "60", "--every-n-steps", "30",
                        "--checkpoint-uri", str(tmp_path / "lm")],
                       capture_output=True, text=True, timeout=280, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"demo: held-out bits/byte ([0-9.]+) -> ([0-9.]+) \(ok\)", p.stdout)
    assert m and float(m.group(2)) < float(m.group(1)) - 1.0, p.stdout[-3000:]
    assert "finished: 60 steps" in p.stdout
