"""Command-line options derived from the config dataclasses: one source for names, defaults and help.

Each field of ScalingConfig, CheckpointConfig, FailureConfig (and RunConfig's plain fields) becomes
`--field-name` (a trailing `_s` dropped: `--collective-timeout`), its help is the field's docstring
and its default is the field's default, shown in the help and applied by the dataclass itself
(an option not given is not passed). A few public flag names predate this and are kept as aliases.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Literal

from elastic.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

# (config, field) -> the flag it has always had.
RENAMED = {
    (CheckpointConfig, "uri"): "--checkpoint-uri",
    (FailureConfig, "snapshot_every_n_steps"): "--snapshot-every",
}
# Boolean fields whose flag sets the opposite value (the default is True).
NEGATED = {(CheckpointConfig, "async_save"): "--sync-checkpoints",
           (FailureConfig, "live_snapshots"): "--copy-snapshots"}
# Fields with no flag: set through code or another option.
SKIPPED = {(RunConfig, "scaling"), (RunConfig, "checkpoint"), (RunConfig, "failure"),
           (RunConfig, "train_loop_config"), (RunConfig, "policy"), (RunConfig, "location")}

CONFIGS = (ScalingConfig, CheckpointConfig, FailureConfig, RunConfig)


@dataclass(frozen=True)
class Option:
    config: type
    field: str
    flag: str
    dest: str
    negated: bool = False


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (parsed from its source), first sentence
    kept whole, whitespace folded."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def options() -> list[Option]:
    out = []
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            if (cls, f.name) in SKIPPED:
                continue
            negated = (cls, f.name) in NEGATED
            flag = NEGATED.get((cls, f.name)) or RENAMED.get((cls, f.name)) or \
                "--" + f.name.removesuffix("_s").replace("_", "-")
            out.append(Option(cls, f.name, flag, dest=f"{cls.__name__}.{f.name}", negated=negated))
    return out


def add_options(parser: argparse.ArgumentParser, *, only: tuple[type, ...] = CONFIGS) -> None:
    """Add one option per config field; an option not given leaves the config's default."""
    hints = {cls: typing.get_type_hints(cls) for cls in CONFIGS}
    for opt in options():
        if opt.config not in only:
            continue
        f = next(f for f in dataclasses.fields(opt.config) if f.name == opt.field)
        doc = field_docs(opt.config).get(opt.field, "")
        kind = hints[opt.config][opt.field]
        default = f.default if f.default is not dataclasses.MISSING else None
        if opt.negated:
            parser.add_argument(opt.flag, dest=opt.dest, action="store_const", const=False, default=None,
                                help=f"set {opt.field}=False; {opt.field}: {doc}".replace("%", "%%"))
            continue
        kw: dict[str, Any] = {"dest": opt.dest, "default": None}
        choices = _choices(kind)
        if choices:
            kw["choices"] = choices
        elif _base(kind) is bool:
            kw["type"] = _parse_bool
            kw["metavar"] = "BOOL"
        else:
            kw["type"] = _base(kind)
            kw["metavar"] = "SECONDS" if opt.field.endswith("_s") else {int: "N", float: "X"}.get(
                kw["type"], opt.field.split("_")[-1].upper())
        shown = "" if default is None else f" (default: {default:g})" if isinstance(default, float) \
            else f" (default: {default})"
        parser.add_argument(opt.flag, help=(doc + shown).replace("%", "%%"), **kw)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` set on the command line."""
    prefix = f"{cls.__name__}."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def _choices(kind: Any) -> list[Any] | None:
    if typing.get_origin(kind) is Literal:
        return list(typing.get_args(kind))
    return None


def _base(kind: Any) -> Any:
    """int for `int | None`, float for `float`, ..."""
    if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if args else str
    return kind if kind in (int, float, str, bool) else str


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false")
