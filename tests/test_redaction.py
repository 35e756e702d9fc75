"""Credentials never reach a printed line: one URL-parsing redaction (elastic._internal.retry.redact) at every
point of printing: CLI errors, Result.summary(), the lease's refusal, log records."""

from __future__ import annotations

import logging

import pytest

from elastic._internal.retry import redact, redact_url

pytestmark = pytest.mark.timeout(60)

SECRETS = ("topsecret", "wJalrXUtnFEMI", "K7MDENG", "sasSIG", "hunter2", "skey1", "skey2", "dictsecret", "AKIDX")


@pytest.mark.parametrize("text,kept", [
    ("s3://AKIDUSER:topsecret@bucket/run", "s3://***@bucket/run"),
    ("s3://AKIDUSER:wJalrXUtnFEMI/K7MDENG@bucket/run/x", "s3://***@bucket/run/x"),  # '/' in the secret
    ("https://acct.blob.core.windows.net/c/run?sv=2022-11-02&sig=sasSIG%2Fx&se=2030", "windows.net/c/run?***"),
    ("s3://bucket/run?secret_key=skey1&endpoint=x", "s3://bucket/run?***"),
    ("cannot open endpoint secret_access_key=skey2, retry", "secret_access_key=***"),
    ("options {'key': 'AKIDX', 'secret': 'dictsecret'}", "'secret': '***'"),
    ('{"aws_secret_access_key": "dictsecret"}', '"aws_secret_access_key": "***"'),
    ("denied sig=sasSIG password=hunter2", "sig=***"),
    ("file:///tmp/runs/a and memory://run", "file:///tmp/runs/a and memory://run"),
])
def test_redact_drops_user_info_queries_and_secret_values(text, kept):
    out = redact(text)
    assert kept in out and not any(s in out for s in SECRETS), out


def test_redact_url_parses_one_url():
    assert redact_url("gs://u:p/q@bucket/run#frag") == "gs://***@bucket/run?***"
    assert redact_url("/plain/path") == "/plain/path"


def test_result_summary_prints_no_credentials():
    from elastic._internal.checkpoint.layout import COMMITTED
    from elastic._internal.checkpoint.catalog import CheckpointInfo
    from elastic.result import Result

    uri = "s3://AKIDUSER:wJalrXUtnFEMI/K7MDENG@bucket/run?sig=sasSIG"
    info = CheckpointInfo(10, f"{uri}/checkpoints/step_00000010", 2, 0.0, 100, COMMITTED)
    r = Result(ok=False, exit_code=1, error=f"write {uri} failed: secret_key=skey1", metrics={}, steps=10,
               seconds=1.0, failures=0, recoveries=[], checkpoint=info, uri=uri)
    text = r.summary()
    assert "last checkpoint: step 10 at s3://***@bucket/run" in text
    assert not any(s in text for s in SECRETS), text


def test_the_lease_refusal_is_printed_redacted(capsys):
    from elastic.cli import main
    from elastic._internal.lease import Lease, this_process

    uri = "memory://AKIDUSER:wJalrXUtnFEMI/K7MDENG@redaction-bucket/run"
    owner = Lease(uri).acquire(this_process("holder"))
    try:
        code = main(["run", "tests/jobs.py:train", "--checkpoint-uri", uri, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and "in use by run holder" in err, err
        assert not any(s in err for s in SECRETS), err
    finally:
        Lease(uri).release(owner)


def test_catalog_log_lines_are_redacted(caplog):
    import fsspec

    from elastic._internal.checkpoint import CheckpointStore

    uri = "memory://AKIDUSER:topsecret@redaction-logs/run"
    cs = CheckpointStore(uri)
    fsspec.filesystem("memory").pipe_file(f"{cs.step_path(5)}/manifest.json", b'{"step": [}')  # torn
    with caplog.at_level(logging.WARNING, logger="elastic"):
        cs.list()
    assert caplog.records and all("topsecret" not in rec.getMessage() for rec in caplog.records), caplog.text
    assert "topsecret" not in caplog.text
