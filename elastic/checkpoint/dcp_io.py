"""The glue to torch.distributed.checkpoint (DCP): write shards with checksums, read them verified.

Files stay standard DCP (torch.save-serialized tensors in *.distcp, a pickled .metadata), so that a
committed step directory loads with plain `dcp.load` and `format_utils.dcp_to_torch_save`.
What we add: every byte written is checksummed on the way out; every file is checked against the
manifest before any of it is trusted; .metadata is unpickled with an allowlist of DCP classes only.

Split by job: dcp_write (shards and .metadata out), dcp_read (verified back in), dcp_wire (plans and
results as JSON between ranks). This module names them all in one place, as callers knew it.
"""

from elastic.checkpoint.dcp_read import (
    FileWindow, VerifyingReader, default_load_planner, load_metadata, read_verified, run_load,
)  # fmt: skip
from elastic.checkpoint.dcp_wire import decode_plan, decode_results, encode_plan, encode_results
from elastic.checkpoint.dcp_write import ShardFS, metadata_bytes, storage_prefix, write_shards

__all__ = [
    "FileWindow", "ShardFS", "VerifyingReader", "decode_plan", "decode_results", "default_load_planner",
    "encode_plan", "encode_results", "load_metadata", "metadata_bytes", "read_verified", "run_load",
    "storage_prefix", "write_shards",
]  # fmt: skip
