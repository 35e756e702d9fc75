"""Where bytes live: URI parsing and validation on top of fsspec.

Local paths go to fsspec's local filesystem; every URL goes through `fsspec.core.url_to_fs`.
"""

from __future__ import annotations

import os

import fsspec
from fsspec.core import url_to_fs

from elastic.errors import ConfigError


def normalize_uri(uri: str) -> str:
    """A plain path becomes file://ABSPATH; URLs are kept as given (minus a trailing slash)."""
    if "://" not in uri:
        return "file://" + os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path inside it) for a URI; ConfigError for a scheme fsspec does not know."""
    uri = normalize_uri(uri)
    scheme = uri.split("://", 1)[0]
    if scheme not in fsspec.available_protocols():
        raise ConfigError(
            f"unknown storage scheme {scheme!r} in {uri!r}: use file://, memory://, s3:// "
            "or another fsspec protocol"
        )
    try:
        fs, path = url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot open storage {uri!r}: {exc}") from None
    return fs, path.rstrip("/") or "/"
