"""A torchrun-style DDP script moves to elastic with the README's few changes, and runs under
`elastic run` (examples/torchrun_train.py -> examples/elastic_train.py)."""

from __future__ import annotations

import ast
import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elastic._internal.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BEFORE, AFTER = ROOT / "examples" / "torchrun_train.py", ROOT / "examples" / "elastic_train.py"
pytestmark = pytest.mark.timeout(180)


def _train_body(path: Path) -> list[str]:
    src = path.read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "train")
    # Compared without indentation: a loop that loses its epoch level is the same loop.
    return [line.split("  # elastic:")[0].strip() for line in src.splitlines()[fn.lineno - 1:fn.end_lineno]]


def test_the_training_function_changes_in_a_few_lines_only():
    diff = [d for d in difflib.unified_diff(_train_body(BEFORE), _train_body(AFTER), lineterm="", n=0)
            if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    removed, added = [d for d in diff if d[0] == "-"], [d for d in diff if d[0] == "+"]
    print("\n".join(diff))
    assert len(removed) <= 12 and len(added) <= 8, diff
    code = "\n".join(line.split("#")[0] for line in AFTER.read_text().splitlines())
    for gone in ("init_process_group", "DistributedSampler", "DDP(", "set_epoch", "destroy_process_group"):
        assert gone not in code, gone


@pytest.mark.slow  # the diff check runs by default; this runs the example
def test_the_moved_script_runs_under_elastic_run(ray_local, tmp_path):
    uri = f"file://{tmp_path}/run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    address = ray_local.get_runtime_context().gcs_address
    p = subprocess.run([sys.executable, "-m", "elastic.cli", "run", f"{AFTER}:train", "--min-workers", "2",
                        "--checkpoint-uri", uri, "--address", address, "--every-n-steps", "32", "--quiet",
                        "--config", "lr=0.05", "--config", "batch_size=64", "--config", "epochs=1"],
                       capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(uri)]
    assert len(losses) == 4096 // 64 and sum(losses[-8:]) < 0.7 * sum(losses[:8]), losses


@pytest.mark.slow
def test_the_original_script_runs_under_torchrun(tmp_path):
    """The 'before' is a real torchrun script (so the comparison is honest). torchrun's workers run
    in sessions of their own: the whole tree is killed, whatever happens."""
    from elastic.chaos import procs

    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(BEFORE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    try:
        out, err = p.communicate(timeout=150)
    finally:
        for child in procs.descendants(p.pid):
            os.kill(child.pid, 9)
        p.kill()
    assert p.returncode == 0, err[-3000:]
    assert "step 120 loss" in out
