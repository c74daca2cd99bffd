"""The instance sections the daemon reads, and the run tags that override them per job.

``runyard.yaml``::

    run_coordinator:
      queued: {max_concurrent_runs: 3, tag_concurrency_limits: [...], priority_tag: runyard/priority}
    run_retries: {max_retries: 2, retry_on: [worker_lost], strategy: from_failure}
    run_monitoring: {poll_interval: 1, start_timeout: 180, cancel_timeout: 60, max_runtime: null}
    daemon: {lease_ttl: 10, log_format: plain}

Parsing imports attrs only: every command validates runyard.yaml, and none may pay for more.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..instance import Instance

SECTIONS = ("run_coordinator", "run_retries", "run_monitoring", "daemon")

# Run tags (set on a job with @job(tags=...) or at launch with --tag) that override settings.
PRIORITY_TAG = "runyard/priority"
MAX_RUNTIME_TAG = "runyard/max_runtime"
MAX_RETRIES_TAG = "runyard/max_retries"
RETRY_ON_TAG = "runyard/retry_on"
RETRY_STRATEGY_TAG = "runyard/retry_strategy"
RETRY_NUMBER_TAG = "runyard/retry_number"  # set by the daemon on the runs it creates

STRATEGIES = ("from_failure", "all_steps")
# Failure kinds a run can end with (runyard.events.FailureKind values); "raised" is the
# plain-language name of "error", a step function that raised.
FAILURE_KINDS = ("error", "timeout", "signal", "oom", "not_started", "worker_lost", "canceled")
KIND_ALIASES = {"raised": "error"}


def _positive(inst: Any, attr: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"'{attr.name}' must be > 0 (seconds): {value}")


def _at_least(minimum: int) -> Any:
    def check(inst: Any, attr: attrs.Attribute[Any], value: int) -> None:
        if value < minimum:
            raise ValueError(f"'{attr.name}' must be >= {minimum}: {value}")

    return check


def _kinds(inst: Any, attr: attrs.Attribute[Any], value: list[str]) -> None:
    for kind in value:
        if KIND_ALIASES.get(kind, kind) not in FAILURE_KINDS:
            raise ValueError(f"'{attr.name}': unknown failure kind '{kind}'; use some of: "
                             f"{', '.join(FAILURE_KINDS)} (or 'raised' for 'error')")


@attrs.frozen(kw_only=True)
class TagLimit:
    """At most ``limit`` runs in flight among those tagged ``key`` (=``value`` when given;
    with ``per_unique_value``, a limit of its own for each value of the tag)."""

    key: str
    value: str | None = None
    per_unique_value: bool = False
    limit: int = attrs.field(validator=_at_least(0))

    def __attrs_post_init__(self) -> None:
        if self.value is not None and self.per_unique_value:
            raise ValueError(f"tag limit on '{self.key}': give either value or per_unique_value: true, not both")

    def bucket(self, tags: Mapping[str, str]) -> tuple[str, str | None] | None:
        """Which counter a run with ``tags`` counts against (None: this limit ignores it)."""
        if self.key not in tags:
            return None
        if self.per_unique_value:
            return (self.key, tags[self.key])
        if self.value is not None:
            return (self.key, self.value) if tags[self.key] == self.value else None
        return (self.key, None)


@attrs.frozen(kw_only=True)
class QueuedCoordinator:
    max_concurrent_runs: int = attrs.field(default=-1, validator=_at_least(-1))  # -1: no limit
    tag_concurrency_limits: list[TagLimit] = attrs.field(factory=list)
    priority_tag: str = PRIORITY_TAG
    dequeue_interval: float = attrs.field(default=0.2, validator=_positive)


@attrs.frozen(kw_only=True)
class RunRetries:
    max_retries: int = attrs.field(default=0, validator=_at_least(0))
    retry_on: list[str] = attrs.field(factory=lambda: ["worker_lost"], validator=_kinds)
    strategy: str = attrs.field(default="from_failure", validator=attrs.validators.in_(STRATEGIES))
    window: float = attrs.field(default=3600.0, validator=_positive)  # only runs that ended this recently


@attrs.frozen(kw_only=True)
class RunMonitoring:
    # 2 s: a death is noticed within ~1 s on average (target 10 s), and watching 1,000 runs
    # costs under 2 % of a core (benchmarks/README.md).
    poll_interval: float = attrs.field(default=2.0, validator=_positive)
    start_timeout: float = attrs.field(default=180.0, validator=_positive)
    cancel_timeout: float = attrs.field(default=60.0, validator=_positive)
    max_runtime: float | None = attrs.field(default=None, validator=_positive)


@attrs.frozen(kw_only=True)
class DaemonOptions:
    lease_ttl: float = attrs.field(default=10.0, validator=_positive)
    log_format: str = attrs.field(default="plain", validator=attrs.validators.in_(("plain", "json")))


@attrs.frozen(kw_only=True)
class DaemonSettings:
    coordinator: QueuedCoordinator | None
    retries: RunRetries
    monitoring: RunMonitoring
    options: DaemonOptions


def parse(raw: Mapping[str, Any], source: str) -> DaemonSettings:
    """The daemon's settings from the top level of runyard.yaml (errors name file and key)."""
    from ..config import structure

    coordinator = None
    section = raw.get("run_coordinator")
    if section is not None:
        if not isinstance(section, Mapping) or set(section) != {"queued"}:
            raise ConfigError(
                f"{source}: run_coordinator: expected {{queued: {{...}}}} (the only coordinator), got {section!r}"
            )
        coordinator = structure(section["queued"], QueuedCoordinator, source=source, path="run_coordinator.queued")
    return DaemonSettings(
        coordinator=coordinator,
        retries=structure(raw.get("run_retries"), RunRetries, source=source, path="run_retries"),
        monitoring=structure(raw.get("run_monitoring"), RunMonitoring, source=source, path="run_monitoring"),
        options=structure(raw.get("daemon"), DaemonOptions, source=source, path="daemon"),
    )


def settings(instance: Instance) -> DaemonSettings:
    return parse(instance.daemon_config, instance.config_source)


def _tag_number(tags: Mapping[str, str], key: str, kind: type, run: str) -> Any:
    text = tags.get(key)
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < 0 or (kind is float and value == 0):
        what = "a number of seconds > 0" if kind is float else "a whole number >= 0"
        raise ConfigError(f"{run}: tag {key}: expected {what}, got {text!r}")
    return value


def check_tags(tags: Mapping[str, str], run: str = "run") -> None:
    """Refuse bad values of the daemon's tags when a run is created, not when it is acted on."""
    _tag_number(tags, MAX_RUNTIME_TAG, float, run)
    _tag_number(tags, MAX_RETRIES_TAG, int, run)
    if PRIORITY_TAG in tags:
        try:
            int(tags[PRIORITY_TAG])
        except ValueError:
            raise ConfigError(
                f"{run}: tag {PRIORITY_TAG}: expected a whole number, got {tags[PRIORITY_TAG]!r}"
            ) from None
    if RETRY_STRATEGY_TAG in tags and tags[RETRY_STRATEGY_TAG] not in STRATEGIES:
        raise ConfigError(f"{run}: tag {RETRY_STRATEGY_TAG}: expected one of {', '.join(STRATEGIES)}, "
                          f"got {tags[RETRY_STRATEGY_TAG]!r}")
    if RETRY_ON_TAG in tags:
        for kind in tags[RETRY_ON_TAG].split(","):
            if KIND_ALIASES.get(kind.strip(), kind.strip()) not in FAILURE_KINDS:
                raise ConfigError(f"{run}: tag {RETRY_ON_TAG}: unknown failure kind {kind.strip()!r}; use a "
                                  f"comma-separated list of: {', '.join(FAILURE_KINDS)}")


def max_runtime(tags: Mapping[str, str], monitoring: RunMonitoring) -> float | None:
    value = _tag_number(tags, MAX_RUNTIME_TAG, float, "run")
    return value if value is not None else monitoring.max_runtime


def retry_policy(tags: Mapping[str, str], retries: RunRetries) -> RunRetries:
    """The instance's retry settings with the run's tags applied."""
    changes: dict[str, Any] = {}
    n = _tag_number(tags, MAX_RETRIES_TAG, int, "run")
    if n is not None:
        changes["max_retries"] = n
    if RETRY_ON_TAG in tags:
        changes["retry_on"] = [k.strip() for k in tags[RETRY_ON_TAG].split(",") if k.strip()]
    if RETRY_STRATEGY_TAG in tags:
        changes["strategy"] = tags[RETRY_STRATEGY_TAG]
    return attrs.evolve(retries, **changes) if changes else retries


def priority(tags: Mapping[str, str], tag: str = PRIORITY_TAG) -> int:
    try:
        return int(tags.get(tag, 0))
    except ValueError:
        return 0
