"""The one module that talks to AWS: every ECS and CloudWatch Logs call of runyard-ecs goes
through `EcsApi`, and only this module imports boto3 and botocore (the executor and the
launcher import it when a run uses them; the plugin module never does).

What it adds to the bare calls:

* RunTask retried with exponential backoff and jitter on throttling ("Rate exceeded"),
  on server errors, and on the placement ``failures[]`` that pass (capacity,
  ``RESOURCE:*``, ``AGENT``); never on a configuration error, which is raised at once as a
  `ConfigError` naming the setting to fix;
* task definitions registered from settings are reused by content: the family is the
  prefix plus a hash of the definition, so one registration serves every run with the same
  settings (never a revision per run), and "Too many concurrent attempts to create a new
  revision" from runs registering together is waited out and the winner's revision reused;
* log reads that page through CloudWatch Logs with the forward token.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from runyard import ConfigError

from .settings import TAG_CONTENT

# Error codes AWS documents as transient for these APIs.
_THROTTLE_CODES = {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
                   "ServerException", "ServiceUnavailable", "InternalFailure"}
# Placement failures of RunTask that another attempt may not meet (capacity comes and goes).
_RETRYABLE_FAILURES = ("RESOURCE:", "AGENT", "Capacity is unavailable", "capacity", "LOCATION")
_CONCURRENT_REVISION = "Too many concurrent attempts"


class AwsError(Exception):
    """An AWS call failed; ``code`` is AWS's error code (or a failure reason)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _message(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Message", "")) or str(e)


def is_throttle(e: BaseException) -> bool:
    if not isinstance(e, botocore.exceptions.ClientError):
        return False
    return _code(e) in _THROTTLE_CODES or "Rate exceeded" in _message(e)


def content_hash(definition: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


class _Clients:
    """The clients of one session, each made on first use. Making a client loads its
    service model (tenths of a second, more on a loaded machine), so `EcsApi.shared` keeps
    one of these per region/endpoint/profile for the whole process: a health check or a
    step's follower then costs its API call, not a new session and three clients."""

    # Botocore's own retries (standard mode) cover the read calls; RunTask's are ours, so
    # that capacity failures and throttling share one backoff and one attempt budget.
    _CONFIGS = {"ecs": ("ecs", 5), "ecs_once": ("ecs", 1), "logs": ("logs", 5),
                "secretsmanager": ("secretsmanager", 5), "ssm": ("ssm", 5)}

    def __init__(self, session: Any, endpoint_url: str | None) -> None:
        self.session = session
        self.endpoint_url = endpoint_url
        self.lock = threading.Lock()  # boto3 sessions are not thread-safe; their clients are
        self.made: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        with self.lock:
            client = self.made.get(key)
            if client is None:
                service, attempts = self._CONFIGS[key]
                config = botocore.config.Config(retries={"mode": "standard", "max_attempts": attempts},
                                                connect_timeout=10, read_timeout=60)
                client = self.made[key] = self.session.client(service, endpoint_url=self.endpoint_url,
                                                              config=config)
            return client


class EcsApi:
    """ECS and CloudWatch Logs clients of one region/endpoint/profile (thread-safe: botocore
    clients are; the session is used only under a lock). `shared` reuses the clients of the
    process; the constructor makes its own (the Stubber tests need clients of their own)."""

    # Registered task definitions of this process, by content hash: a second run with the
    # same settings skips even the describe call.
    _registered: dict[str, str] = {}
    _registered_lock = threading.Lock()
    _shared: dict[tuple[str | None, str | None, str | None], _Clients] = {}
    _shared_lock = threading.Lock()

    def __init__(self, *, region: str | None, endpoint_url: str | None, profile: str | None, where: str,
                 sleep: Callable[[float], None] = time.sleep, clients: _Clients | None = None) -> None:
        self.where = where
        self.sleep = sleep
        self._clients = clients or self._session(region, endpoint_url, profile, where)
        self.region = self._clients.session.region_name

    @classmethod
    def shared(cls, *, region: str | None, endpoint_url: str | None, profile: str | None, where: str) -> EcsApi:
        """An API on this process's clients of ``region``/``endpoint_url``/``profile``."""
        key = (region or None, endpoint_url or None, profile or None)
        with cls._shared_lock:
            clients = cls._shared.get(key)
        if clients is None:
            clients = cls._session(region, endpoint_url, profile, where)
            with cls._shared_lock:
                clients = cls._shared.setdefault(key, clients)
        return cls(region=region, endpoint_url=endpoint_url, profile=profile, where=where, clients=clients)

    @staticmethod
    def _session(region: str | None, endpoint_url: str | None, profile: str | None, where: str) -> _Clients:
        try:
            session = boto3.Session(profile_name=profile or None, region_name=region or None)
        except botocore.exceptions.ProfileNotFound as e:
            raise ConfigError(f"{where}.profile: {e}; name a profile of ~/.aws/config or leave it out") from None
        if session.region_name is None:
            raise ConfigError(f"{where}.region: no AWS region given, and none in the environment (AWS_REGION, "
                              "AWS_DEFAULT_REGION) or the profile; set region: us-east-1 (or yours)")
        return _Clients(session, endpoint_url or None)

    @property
    def ecs(self) -> Any:
        return self._clients.get("ecs")

    @property
    def ecs_once(self) -> Any:
        return self._clients.get("ecs_once")

    @property
    def logs(self) -> Any:
        return self._clients.get("logs")

    # -- task definitions -------------------------------------------------------------------

    def ensure_task_definition(self, prefix: str, definition: dict[str, Any], attempts: int = 6) -> str:
        """The ARN of a task definition with exactly ``definition``: an existing one of the
        content's family when it matches, else a new registration (see the module docstring)."""
        digest = content_hash(definition)
        with self._registered_lock:
            known = self._registered.get(digest)
        if known:
            return known
        family = f"{prefix}-{digest}"
        delay = 0.5
        for attempt in range(attempts):
            arn = self._matching(family, digest)
            if arn is None:
                try:
                    out = self.ecs_once.register_task_definition(
                        family=family, tags=[{"key": TAG_CONTENT, "value": digest}], **definition)
                    arn = out["taskDefinition"]["taskDefinitionArn"]
                except botocore.exceptions.ClientError as e:
                    msg = _message(e)
                    if (_CONCURRENT_REVISION in msg or is_throttle(e)) and attempt + 1 < attempts:
                        # Another run registers the same content right now: wait, then reuse its revision.
                        self.sleep(delay * (0.5 + random.random()))
                        delay = min(delay * 2, 10)
                        continue
                    raise self._config_error("registering the task definition", e) from None
            with self._registered_lock:
                self._registered[digest] = arn
            return arn
        raise ConfigError(f"{self.where}: could not register task definition family {family} after "
                          f"{attempts} attempts (concurrent registrations or throttling); try again")

    def forget_task_definition(self, arn: str) -> None:
        """Drop a cached ARN that AWS no longer knows (deregistered, or an emulator restarted)."""
        with self._registered_lock:
            for k, v in list(self._registered.items()):
                if v == arn:
                    del self._registered[k]

    def _matching(self, family: str, digest: str) -> str | None:
        try:
            out = self.ecs.describe_task_definition(taskDefinition=family, include=["TAGS"])
        except botocore.exceptions.ClientError as e:
            if _code(e) in ("ClientException", "InvalidParameterException") or "Unable to describe" in _message(e) \
                    or "Unable to find" in _message(e):
                return None
            raise self._config_error("describing the task definition", e) from None
        td = out.get("taskDefinition") or {}
        tags = {t.get("key"): t.get("value") for t in out.get("tags") or []}
        if td.get("status", "ACTIVE") != "ACTIVE" or tags.get(TAG_CONTENT, digest) != digest:
            return None
        return td.get("taskDefinitionArn")

    def describe_task_definition(self, ref: str) -> dict[str, Any]:
        try:
            return self.ecs.describe_task_definition(taskDefinition=ref)["taskDefinition"]
        except botocore.exceptions.ClientError as e:
            raise ConfigError(f"{self.where}.task_definition: {ref!r} cannot be described: {_message(e)}; name an "
                              "existing family, family:revision or ARN") from None

    # -- tasks ----------------------------------------------------------------------------------

    def run_task(self, kwargs: dict[str, Any], attempts: int) -> dict[str, Any]:
        """RunTask, retried (see the module docstring); the task as RunTask described it."""
        delay = 1.0
        last = ""
        for attempt in range(attempts):
            try:
                out = self.ecs_once.run_task(**kwargs)
            except botocore.exceptions.ClientError as e:
                if not is_throttle(e):
                    raise self._config_error("RunTask", e) from None
                last = f"{_code(e)}: {_message(e)}"
            except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as e:
                raise ConfigError(f"{self.where}.endpoint_url: ECS is not reachable: {e}") from None
            else:
                tasks = out.get("tasks") or []
                failures = out.get("failures") or []
                if tasks:
                    return tasks[0]
                reason = "; ".join(f"{f.get('reason', '?')}" + (f" ({f['detail']})" if f.get("detail") else "")
                                   for f in failures) or "RunTask returned no task and no failure"
                if not any(marker.lower() in reason.lower() for marker in _RETRYABLE_FAILURES):
                    raise AwsError(f"RunTask failed: {reason}", code="failure")
                last = reason
            if attempt + 1 < attempts:
                self.sleep(min(delay, 30.0) * (0.5 + random.random()))
                delay *= 2
        raise AwsError(f"RunTask failed {attempts} times; last: {last}", code="exhausted")

    def describe_task(self, cluster: str, arn: str) -> tuple[dict[str, Any] | None, str | None]:
        """(the task, None), or (None, the failure reason: MISSING when ECS does not know it)."""
        out = self.ecs.describe_tasks(cluster=cluster, tasks=[arn])
        tasks = out.get("tasks") or []
        if tasks:
            return tasks[0], None
        failures = out.get("failures") or []
        return None, (failures[0].get("reason") if failures else "MISSING")

    def stop_task(self, cluster: str, arn: str, reason: str) -> None:
        try:
            self.ecs.stop_task(cluster=cluster, task=arn, reason=reason[:255])
        except botocore.exceptions.ClientError as e:
            # Stopping a task ECS no longer knows (or that stopped already) is done.
            if _code(e) not in ("InvalidParameterException", "ClientException"):
                raise

    def run_tasks(self, cluster: str, started_by: str) -> list[str]:
        """ARNs of the cluster's tasks started with ``started_by`` that are not stopped."""
        arns: list[str] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"cluster": cluster, "startedBy": started_by, "desiredStatus": "RUNNING"}
            if token:
                kwargs["nextToken"] = token
            out = self.ecs.list_tasks(**kwargs)
            arns.extend(out.get("taskArns") or [])
            token = out.get("nextToken")
            if not token:
                return arns

    # -- secrets ----------------------------------------------------------------------------------

    def secret_value(self, ref: str, key: str) -> str:
        """The value of a Secrets Manager secret (ARN) or Parameter Store parameter (ARN or
        name, decrypted), as ECS would put it in a container's environment. ``key``: the
        setting that names it, for the error."""
        try:
            if ":secretsmanager:" in ref:
                return str(self._clients.get("secretsmanager").get_secret_value(SecretId=ref)["SecretString"])
            out = self._clients.get("ssm").get_parameter(Name=ref, WithDecryption=True)
            return str(out["Parameter"]["Value"])
        except botocore.exceptions.ClientError as e:
            raise ConfigError(f"{self.where}.{key}: {ref!r} cannot be read: {_code(e)}: {_message(e)}; create it, "
                              "or give these credentials secretsmanager:GetSecretValue (ssm:GetParameter)") from None

    def put_secret(self, ref: str, key: str, value: str) -> None:
        """Store ``value`` in the secret or parameter ``ref`` unless it holds it already."""
        try:
            current: str | None = self.secret_value(ref, key)
        except ConfigError:
            current = None
        if current == value:
            return
        try:
            if ":secretsmanager:" in ref:
                self._clients.get("secretsmanager").put_secret_value(SecretId=ref, SecretString=value)
            else:
                self._clients.get("ssm").put_parameter(Name=ref, Value=value, Type="SecureString", Overwrite=True)
        except botocore.exceptions.ClientError as e:
            raise ConfigError(f"{self.where}.{key}: {ref!r} cannot be written: {_code(e)}: {_message(e)}; create it, "
                              "or give these credentials secretsmanager:PutSecretValue (ssm:PutParameter)") from None

    # -- logs -------------------------------------------------------------------------------------

    def ensure_log_group(self, group: str) -> None:
        try:
            self.logs.create_log_group(logGroupName=group)
        except botocore.exceptions.ClientError as e:
            if _code(e) != "ResourceAlreadyExistsException":
                raise self._config_error(f"creating log group {group}", e) from None

    def log_events(self, group: str, stream: str, token: str | None) -> tuple[list[str], str | None]:
        """New lines of a log stream after ``token`` (all from the start when None), and the
        token to continue from. A stream not created yet has no lines."""
        kwargs: dict[str, Any] = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
        lines: list[str] = []
        while True:
            if token:
                kwargs["nextToken"] = token
            try:
                out = self.logs.get_log_events(**kwargs)
            except botocore.exceptions.ClientError as e:
                if _code(e) == "ResourceNotFoundException":
                    return lines, token
                raise
            events = out.get("events") or []
            lines.extend(str(e.get("message", "")) for e in events)
            nxt = out.get("nextForwardToken")
            if not events or nxt == token:
                return lines, nxt or token
            token = nxt

    def log_tail(self, group: str, stream: str, lines: int) -> list[str]:
        try:
            out = self.logs.get_log_events(logGroupName=group, logStreamName=stream, limit=lines,
                                           startFromHead=False)
        except botocore.exceptions.ClientError:
            return []
        return [str(e.get("message", "")) for e in out.get("events") or []]

    # -- errors ---------------------------------------------------------------------------------

    def _config_error(self, doing: str, e: botocore.exceptions.ClientError) -> ConfigError:
        code = _code(e)
        hint = {
            "AccessDeniedException": "the credentials lack an ECS permission (see docs/backends/ecs.md, IAM)",
            "ClusterNotFoundException": "create the cluster, or set cluster to an existing one",
            "UnrecognizedClientException": "check the AWS credentials and the region",
        }.get(code, "check the settings named in the message")
        return ConfigError(f"{self.where}: {doing} failed: {code}: {_message(e)}; {hint}")


def error_types() -> tuple[type[BaseException], ...]:
    """Exceptions of AWS calls a caller may meet besides ConfigError and AwsError (network,
    credentials): for callers that must not import botocore themselves."""
    return (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, AwsError)
