"""run.json's record of a run's policy: its class name (DefaultPolicy by its public, stable name)
and DefaultPolicy's fields, and the policy a resume runs under (a user's policy is never imported
from run.json)."""

from __future__ import annotations

import dataclasses
from typing import Any

from elastic.errors import ConfigError
from elastic._internal.supervisor.policy import DefaultPolicy


def policy_name(policy: object | None) -> str:
    """The qualified class name of a run's policy (None: elastic's DefaultPolicy)."""
    cls = type(policy) if policy is not None else DefaultPolicy
    return f"{cls.__module__}.{cls.__qualname__}"


# run.json names DefaultPolicy by its public module, which stays put when the internals move; the
# second name is the one runs recorded before elastic/_internal/ existed, still resumed as the default.
DEFAULT_POLICY_NAME = "elastic.policy.DefaultPolicy"
DEFAULT_POLICY_NAMES = (DEFAULT_POLICY_NAME, "elastic.supervisor.policy.DefaultPolicy")


def policy_spec(policy: object | None) -> dict[str, Any]:
    """run.json's record of the policy: its class, and DefaultPolicy's fields (which a resume rebuilds)."""
    if policy is None or type(policy) is DefaultPolicy:
        return {"class": DEFAULT_POLICY_NAME, "fields": dataclasses.asdict(policy or DefaultPolicy())}
    return {"class": policy_name(policy)}


def stored_policy(spec: Any, *, where: str, default: bool = False) -> DefaultPolicy | None:
    """The policy a resume runs under, from run.json's record of it (`where`: the run's location, for
    the message). DefaultPolicy comes back with its fields; a user's policy is never imported from
    run.json (anyone who can write the location can write it, so it is not trusted to name code): a
    ConfigError names the fix, unless `default` (--default-policy) accepts DefaultPolicy instead."""
    if not isinstance(spec, dict) or spec.get("class") in (None, *DEFAULT_POLICY_NAMES):
        fields = spec.get("fields") if isinstance(spec, dict) else None
        try:
            return DefaultPolicy(**fields) if isinstance(fields, dict) else None
        except TypeError as exc:  # fields of another version of elastic
            raise ConfigError(f"{where}/run.json records DefaultPolicy fields this version of elastic does not "
                              f"know ({exc}): pass --default-policy to resume with the defaults") from None
    if default:
        return None
    name = spec["class"]
    raise ConfigError(f"{where}/run.json records the policy {name}, which `elastic resume` does not import: resume "
                      f"from Python with ElasticTrainer(..., policy={name.rsplit('.', 1)[-1]}(...)) on the same "
                      "checkpoint uri, or pass --default-policy to continue under elastic's DefaultPolicy")
