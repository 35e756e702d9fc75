"""`elastic` command line: run, resume, and look at what a run stored.

Exit codes: 0 done, 1 training failed, 2 bad usage or input. Errors are one line on stderr;
set ELASTIC_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

from elastic._internal import cli_options
from elastic.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastic.errors import ConfigError, ElasticError
from elastic._internal.retry import redact


def parse_config_pairs(pairs: list[str]) -> dict[str, Any]:
    """--config k=v (repeatable): values parse as JSON where they can, else stay strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--config {pair!r} is not key=value: write e.g. --config lr=0.1")
        key, raw = pair.split("=", 1)
        if not key:
            raise ConfigError(f"--config {pair!r} has an empty key")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def load_entrypoint(spec: str) -> Callable[[dict], Any]:
    """'path/to/file.py:function' -> the function, shipped to workers by value."""
    if ":" not in spec:
        raise ConfigError(f"entry point {spec!r} must be FILE.py:FUNCTION, e.g. train.py:train")
    path_s, func = spec.rsplit(":", 1)
    path = Path(path_s).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"entry file {path_s!r} does not exist: check the path")
    name = f"elastic_entry_{path.stem}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ConfigError(f"cannot import {path_s!r} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    mod_spec.loader.exec_module(module)
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"{path_s!r} has no function {func!r}: check the name after the colon")
    from ray import cloudpickle  # Ray serializes with its own vendored copy

    # Workers may run on nodes without this file on sys.path: send its code, not a reference.
    cloudpickle.register_pickle_by_value(module)
    return fn


def _add_run_options(p: argparse.ArgumentParser) -> None:
    cli_options.add_options(p)  # one per config field: names, defaults and help come from the configs
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="the training function's config, repeatable; values parse as JSON where they can")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: RAY_ADDRESS if set, "
                                                   "else a local one)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write metrics and membership events for TensorBoard to DIR")


def _configs(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's configs: `base` (a stored spec) overridden by what the command line gives. Each is
    validated as it is built, before anything starts."""
    base = base or {}
    run = {k: base[k] for k in ("name", "seed", "stop_timeout_s") if k in base}
    try:
        return {
            "scaling": ScalingConfig(**{**base.get("scaling", {}), **cli_options.given(args, ScalingConfig)}),
            "checkpoint": CheckpointConfig(**{**base.get("checkpoint", {}), **cli_options.given(args, CheckpointConfig)}),
            "failure": FailureConfig(**{**base.get("failure", {}), **cli_options.given(args, FailureConfig)}),
            "run": {**run, **cli_options.given(args, RunConfig)},
        }
    except TypeError as exc:  # a stored spec with fields this version does not know
        raise ConfigError(f"the stored run spec does not fit this version of elastic ({exc}): start the run "
                          "again with `elastic run`") from None


def _trainer(fn: Callable, entry: str, args: argparse.Namespace, cfg: dict[str, Any],
             train_loop_config: dict[str, Any], name: str | None = None, seed: int | None = None,
             policy: Any = None) -> Any:
    from elastic.trainer import ElasticTrainer

    # Only what is given is passed: the defaults are RunConfig's (ElasticTrainer's keywords read them).
    run = {**({"seed": seed} if seed is not None else {}), **cfg["run"]}
    run["name"] = run.get("name") or name or Path(entry.rsplit(":", 1)[0]).stem
    return ElasticTrainer(
        fn, train_loop_config=train_loop_config, scaling=cfg["scaling"], checkpoint=cfg["checkpoint"],
        failure=cfg["failure"], **run, address=args.address, entrypoint=entry, callbacks=_callbacks(args),
        policy=policy)


def _callbacks(args: argparse.Namespace) -> list[Any]:
    if not args.tensorboard:
        return []
    from elastic.callbacks import TensorBoard

    return [TensorBoard(args.tensorboard)]


def cmd_run(args: argparse.Namespace) -> int:
    # Validate everything cheap before Ray starts.
    loop_config = parse_config_pairs(args.config)
    cfg = _configs(args)
    if cfg["checkpoint"].uri:
        from elastic._internal.storage_cmds import open_location

        open_location(cfg["checkpoint"].uri)
    fn = load_entrypoint(args.entrypoint)
    trainer = _trainer(fn, args.entrypoint, args, cfg, loop_config)
    return _finish(trainer.fit(raise_on_failure=False, quiet=args.quiet))


def cmd_resume(args: argparse.Namespace) -> int:
    from elastic._internal.storage_cmds import open_location
    from elastic._internal.supervisor.policy_record import stored_policy
    from elastic.trainer import load_spec

    open_location(args.uri)
    spec = load_spec(args.uri)
    if spec is None:
        raise ConfigError(f"no run at {args.uri!r} (no run.json): start one with `elastic run FILE.py:FN "
                          "--checkpoint-uri URI`")
    # The run continues where it is pointed at: URI, not the location it was first started in.
    if cli_options.given(args, CheckpointConfig).get("uri") is not None:
        raise ConfigError("elastic resume URI takes its location from URI: drop --checkpoint-uri")
    spec = {**spec, "checkpoint": {**spec["checkpoint"], "uri": args.uri}}
    cfg = _configs(args, spec)
    policy = stored_policy(spec.get("policy"), where=redact(args.uri), default=args.default_policy)
    loop_config = {**spec["train_loop_config"], **parse_config_pairs(args.config)}
    entry = args.entrypoint or spec["entrypoint"]
    if args.entrypoint is None:
        _check_stored_entrypoint(args, spec)
    named = "" if args.entrypoint else f" as named in {redact(args.uri)}/run.json"
    print(f"[elastic] resume runs {entry} (sha256 {_sha256(entry)[:12]}){named}", file=sys.stderr, flush=True)
    fn = load_entrypoint(entry)
    trainer = _trainer(fn, entry, args, cfg, loop_config, name=spec.get("name", "elastic"), seed=spec.get("seed", 0),
                       policy=policy)
    return _finish(trainer.fit(raise_on_failure=False, quiet=args.quiet))


def _sha256(entry: str) -> str:
    from elastic.trainer import resolve_entrypoint

    try:
        return resolve_entrypoint(entry)[1]
    except (OSError, ValueError):
        return "?"  # load_entrypoint says what is wrong with it


def _check_stored_entrypoint(args: argparse.Namespace, spec: dict[str, Any]) -> None:
    """run.json lives with the run's data, so it is not trusted to name code: its entry point runs
    only if this user started a run with that very file on this machine (elastic._internal.trusted), or
    --trust-entrypoint says so; otherwise one line asks for --entrypoint."""
    from elastic._internal import trusted

    entry = spec["entrypoint"]
    path = entry.rsplit(":", 1)[0]
    if not Path(path).is_file():
        raise ConfigError(f"the run's entry file {path} is gone: pass --entrypoint FILE.py:FUNCTION")
    actual = _sha256(entry)
    if spec.get("entrypoint_sha256") and actual != spec["entrypoint_sha256"]:
        raise ConfigError(f"the run's entry file {path} changed since the run started: resume with "
                          f"--entrypoint {entry} to run it as it is now")
    if not args.trust_entrypoint and not trusted.is_trusted(entry, actual):
        host = spec.get("host") or "an unknown host"
        raise ConfigError(f"{redact(args.uri)}/run.json (written on {host}) names {entry} (sha256 {actual[:12]}), "
                          "which no run of yours on this machine was started with: read it, then resume with "
                          f"--entrypoint {entry} (or --trust-entrypoint)")


def _finish(result: Any) -> int:
    if not result.ok:
        text = redact((result.error or "training failed").strip().splitlines()[-1])
        print(f"{'stopped' if result.stopped else 'error'}: {text}", file=sys.stderr)
    return result.exit_code


def _step(text: str) -> int:
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step number") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"steps are >= 0, got {step}")
    return step


class _Parser(argparse.ArgumentParser):
    """Usage errors as one `error:` line naming the fix, like every other error (exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elastic", description="Fault-tolerant elastic training on Ray")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="start (or continue) a run")
    p.add_argument("entrypoint", help="FILE.py:FUNCTION")
    _add_run_options(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("resume", help="continue a run from its checkpoint location with its stored spec "
                                      "(options given here override the stored ones)")
    p.add_argument("uri")
    _add_run_options(p)
    p.add_argument("--entrypoint", default=None, metavar="FILE.py:FUNCTION",
                   help="run this entry point instead of the stored one (needed when it moved or changed, "
                        "or when no run of yours on this machine was started with it)")
    p.add_argument("--trust-entrypoint", action="store_true",
                   help="run the entry file named in URI/run.json even though no run of yours on this machine "
                        "was started with it (run.json is written by whoever can write URI)")
    p.add_argument("--default-policy", action="store_true",
                   help="continue a run started with a policy of your own (ElasticTrainer(policy=...)) under "
                        "elastic's DefaultPolicy; run.json names the policy, but resume never imports it")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("ls", help="list checkpoints at a location")
    p.add_argument("uri")
    p.add_argument("--verify", action="store_true", help="check every shard's checksum (marks corrupt ones)")
    p.set_defaults(func=lambda a: _storage_cmd("cmd_ls", a.uri, verify=a.verify))
    p = sub.add_parser("inspect", help="tensor names, shapes, dtypes and shards of a checkpoint")
    p.add_argument("uri")
    p.add_argument("--step", type=_step, default=None)
    p.set_defaults(func=lambda a: _storage_cmd("cmd_inspect", a.uri, step=a.step))
    p = sub.add_parser("verify", help="check every shard of a checkpoint against its manifest")
    p.add_argument("uri")
    p.add_argument("--step", type=_step, default=None)
    p.set_defaults(func=lambda a: _storage_cmd("cmd_verify", a.uri, step=a.step))
    p = sub.add_parser("export", help="write a checkpoint as one torch.save file")
    p.add_argument("uri")
    p.add_argument("out")
    p.add_argument("--step", type=_step, default=None)
    p.set_defaults(func=lambda a: _storage_cmd("cmd_export", a.uri, a.out, step=a.step))
    sub.add_parser("chaos", help="inject faults into a live run at random (elastic chaos URI --help)",
                   add_help=False)
    p = sub.add_parser("events", help="show a run's event log")
    p.add_argument("uri")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda a: _storage_cmd("cmd_events", a.uri, as_json=a.json))
    p = sub.add_parser("plot", help="a PNG of a metric by step, failures and resizes marked")
    p.add_argument("uri")
    p.add_argument("--out", default="elastic-plot.png", help="the PNG to write (default: %(default)s)")
    p.add_argument("--metric", default="loss", help="which metric (default: %(default)s)")
    p.set_defaults(func=cmd_plot)
    return parser


def cmd_plot(args: argparse.Namespace) -> int:
    from elastic._internal.plot import plot
    from elastic._internal.storage_cmds import open_location

    open_location(args.uri)
    print(redact(plot(args.uri, args.out, args.metric)))
    return 0


def _storage_cmd(name: str, *args: Any, **kwargs: Any) -> int:
    from elastic._internal import storage_cmds

    return getattr(storage_cmds, name)(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chaos"]:
        from elastic.chaos import tool

        return tool.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ElasticError as exc:
        if os.environ.get("ELASTIC_DEBUG"):
            traceback.print_exc()
        print(f"error: {redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)}",
              file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # storage or the system failed under a command: still one line, no traceback
        if os.environ.get("ELASTIC_DEBUG"):
            traceback.print_exc()
        print(f"error: {redact(f'{type(exc).__name__}: {exc}'.splitlines()[0])}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
