"""What a step worker agrees to run: signed step requests, within its own allowance.

A step request (`runyard.plugin.StepRequest`) is plain JSON that names code to import (its
code pointer) and a store to unpickle inputs from (its output store). A worker that obeyed
any request would run whatever a message told it to, so a worker that takes requests from
across a boundary (a broker, a cluster scheduler, a container's command line) runs one only
when

1. it carries a valid signature: HMAC-SHA256, with a key both sides read from their own
   configuration, over the request's canonical JSON (`sign_request`, `verify_request`); and
2. its code pointer lies in one of the worker's own code locations and its output store is
   one of the worker's own output stores, with input references confined to that store
   (`WorkerPolicy.check`).

Anything else is refused before anything is imported or unpickled, and the attempt reports
a STEP_FAILURE (NOT_STARTED) that says why (`execute_trusted_step`). The threat model and
the settings are in docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .config import resolve, structure
from .errors import ConfigError, RunyardError
from .events import Event, EventType, FailureInfo, FailureKind

if TYPE_CHECKING:
    from .instance import Instance
    from .plugin import StepRequest

SIGNING_KEY_ENV = "RUNYARD_SIGNING_KEY"
"""The environment variable holding the step signing key when runyard.yaml does not name one."""

STEP_WORKER_ENV = "RUNYARD_STEP_WORKER"
"""JSON ``{"code_locations": [...], "output_stores": [...]}``: a worker's allowance set by
whoever started it (the Docker executor sets it for the containers it starts)."""

SIGNATURE_FIELD = "signature"
_SCHEME = "hmac-sha256:"
MIN_KEY_LENGTH = 16
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
DOCS = "docs/security.md"


class RequestRefused(RunyardError):
    """A step request this worker will not run (unsigned, altered, or outside its allowance)."""


# -- signing -------------------------------------------------------------------------------


def canonical_json(data: Any) -> bytes:
    """The one byte string both sides sign: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _mac(key: bytes, body: Mapping[str, Any]) -> str:
    return _SCHEME + hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def sign_request(request: StepRequest, key: bytes) -> dict[str, Any]:
    """The request as JSON data with its ``signature`` field added."""
    body = request.to_dict()
    return {**body, SIGNATURE_FIELD: _mac(key, body)}


def verify_request(payload: Mapping[str, Any], key: bytes) -> StepRequest:
    """The request in ``payload`` if its signature is valid for ``key``; RequestRefused otherwise."""
    from .plugin import StepRequest

    if not isinstance(payload, Mapping):
        raise RequestRefused(f"a step request must be a JSON object, got {type(payload).__name__}")
    signature = payload.get(SIGNATURE_FIELD)
    if signature is None:
        raise RequestRefused(
            "the step request is not signed, and this worker runs signed requests only "
            f"(the sender must have the same signing key; see {DOCS})"
        )
    body = {k: v for k, v in payload.items() if k != SIGNATURE_FIELD}
    try:
        expected = _mac(key, body)
    except (TypeError, ValueError) as e:
        raise RequestRefused(f"the step request is not plain JSON data: {e}") from None
    if not isinstance(signature, str) or not hmac.compare_digest(signature.encode(), expected.encode()):
        raise RequestRefused(
            "the step request's signature does not match: it was altered, or signed with another key "
            f"(the run worker and this worker must use the same signing key; see {DOCS})"
        )
    try:
        return StepRequest.from_dict(body)
    except Exception as e:
        raise RequestRefused(f"malformed step request: {type(e).__name__}: {e}") from None


def new_signing_key() -> str:
    """A fresh random key (64 hex characters), e.g. for the containers of one run."""
    return secrets.token_hex(32)


def key_bytes(text: str, *, where: str) -> bytes:
    if len(text) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"{where}: the step signing key is {len(text)} characters long; use at least {MIN_KEY_LENGTH} "
            "random characters, e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    return text.encode()


# -- the worker's own settings ---------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StepWorkerSettings:
    """The ``step_worker:`` section of runyard.yaml.

    ``code_locations``: directories (or ``.py`` files) and module names whose jobs step
    workers of this instance may load; a path is relative to runyard.yaml's folder.
    ``output_stores``: the output stores they may read and write, each with the folders in it
    (default: this instance's ``outputs``). ``signing_key``: the key step requests are signed with and checked against,
    on the engine's side and the workers' (default ``{env: RUNYARD_SIGNING_KEY}``).
    """

    code_locations: list[str] = attrs.field(factory=list)
    output_stores: list[str] | None = None
    signing_key: str | None = None  # may be {env: NAME}: the str hook makes it an EnvVar


def instance_settings(instance: Instance | None) -> StepWorkerSettings:
    raw = getattr(instance, "step_worker_config", None) if instance is not None else None
    source = instance.config_source if instance is not None else "step_worker"
    return structure(raw, StepWorkerSettings, source=source, path="step_worker")


def configured_signing_key(instance: Instance | None = None) -> bytes | None:
    """The signing key this side is configured with, or None when there is none.

    ``step_worker.signing_key`` in runyard.yaml if given (a ``{env: NAME}`` that is unset is
    an error), else the ``RUNYARD_SIGNING_KEY`` environment variable, else None.
    """
    settings = instance_settings(instance)
    if settings.signing_key is not None:
        where = f"{instance.config_source if instance else 'config'}: step_worker.signing_key"
        try:
            text = resolve(settings.signing_key)
        except ConfigError as e:
            # An {env: NAME} read from runyard.yaml names the file and key path itself.
            raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        return key_bytes(text or "", where=where)
    text = os.environ.get(SIGNING_KEY_ENV)
    if text:
        return key_bytes(text, where=f"environment variable {SIGNING_KEY_ENV}")
    return None


def signing_key_at(instance_home: str | os.PathLike[str] | None) -> bytes | None:
    """`configured_signing_key` of the instance at ``instance_home`` (a handler's
    ``context.instance_home``); without a home, the ``RUNYARD_SIGNING_KEY`` variable only."""
    from .instance import Instance

    return configured_signing_key(Instance(instance_home) if instance_home is not None else None)


def missing_key_error(what: str) -> ConfigError:
    return ConfigError(
        f"{what}: no step signing key is configured. Step requests that cross a broker or a cluster "
        f"scheduler are signed, and workers refuse unsigned ones. Set the environment variable "
        f"{SIGNING_KEY_ENV} to the same secret (at least {MIN_KEY_LENGTH} characters, e.g. "
        "`python -c 'import secrets; print(secrets.token_hex(32))'`) for the run worker and every step "
        f"worker, or name another variable with `step_worker: {{signing_key: {{env: NAME}}}}` in "
        f"runyard.yaml (see {DOCS})"
    )


@attrs.frozen
class CodeLocation:
    """One allowed code location: a directory, a single ``.py`` file, or a module (and its submodules)."""

    path: Path | None = None
    module: str | None = None

    @classmethod
    def parse(cls, text: str, *, base: Path | None, where: str) -> CodeLocation:
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{where}: expected a directory or a module name, got {text!r}")
        if "/" in text or os.sep in text or text.startswith((".", "~")) or text.endswith(".py"):
            path = Path(text).expanduser()
            if not path.is_absolute():
                path = (base or Path.cwd()) / path
            return cls(path=path.resolve())
        if not _MODULE.match(text):
            raise ConfigError(
                f"{where}: {text!r} is neither a path (give directories with a '/', e.g. ./jobs) nor a "
                "module name (like mypackage.jobs)"
            )
        return cls(module=text)

    def allows(self, file: str | None, module: str | None) -> bool:
        """Whether the code at ``file`` (a resolved absolute path) or ``module`` is in this location."""
        if self.module is not None:
            return module is not None and (module == self.module or module.startswith(self.module + "."))
        assert self.path is not None
        return file is not None and _within(file, str(self.path))

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else self.module or ""


def normalize_store(url: str) -> str:
    """Equal for equal stores: a path and its ``file://`` URL resolve to one absolute path."""
    from urllib.parse import unquote, urlsplit

    if url.startswith("/"):  # the common case, without urlsplit: a path has no scheme
        return os.path.realpath(url)
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        return str(Path(unquote(parts.path) if parts.scheme else url).expanduser().resolve())
    return url.rstrip("/")


def store_within(store: str, root: str) -> bool:
    """Whether the (normalized) store ``store`` is the allowed store ``root`` or a folder in it."""
    if store == root:
        return True
    if store.startswith("/") != root.startswith("/"):
        return False
    if store.startswith("/"):
        return _within(store, root)
    rest = store[len(root):] if store.startswith(root.rstrip("/") + "/") else None
    return rest is not None and all(p not in ("", ".", "..") for p in rest.strip("/").split("/"))


def _within(path: str, root: str) -> bool:
    """Whether the normalized absolute ``path`` is ``root`` or below it (strings, not pathlib:
    a worker checks every request it gets)."""
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


def _check_ref(ref: Any, param: str) -> None:
    if not isinstance(ref, str) or not ref:
        raise RequestRefused(f"input '{param}': an output reference must be a non-empty string, got {ref!r}")
    parts = ref.split("/")
    if (
        ref.startswith("/")
        or "\\" in ref
        or "\0" in ref
        or ":" in parts[0]
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise RequestRefused(
            f"input '{param}': output reference {ref!r} is not a path inside the output store "
            "(references look like RUN_ID/STEP_KEY)"
        )


@attrs.frozen(kw_only=True)
class WorkerPolicy:
    """What one step worker agrees to run (see the module docstring).

    ``signing_key`` None with ``require_signature`` refuses every request, saying that no
    key is configured; without ``require_signature`` (a local command run by the user
    themselves), unsigned requests are checked against the allowance only.
    """

    code_locations: tuple[CodeLocation, ...] = ()
    output_stores: tuple[str, ...] = ()
    signing_key: bytes | None = attrs.field(default=None, repr=False)
    require_signature: bool = True
    source: str = "this worker's configuration"

    def admit(self, payload: Mapping[str, Any] | str) -> StepRequest:
        """The request to run, or RequestRefused: signature first, then the allowance."""
        from .plugin import StepRequest

        if isinstance(payload, str | bytes):
            try:
                payload = json.loads(payload)
            except ValueError as e:
                raise RequestRefused(f"malformed step request: {e}") from None
        if not isinstance(payload, Mapping):
            raise RequestRefused(f"a step request must be a JSON object, got {type(payload).__name__}")
        if self.signing_key is not None:
            request = verify_request(payload, self.signing_key)
        elif self.require_signature:
            raise RequestRefused(str(missing_key_error("this step worker")))
        else:
            try:
                request = StepRequest.from_dict({k: v for k, v in payload.items() if k != SIGNATURE_FIELD})
            except Exception as e:
                raise RequestRefused(f"malformed step request: {type(e).__name__}: {e}") from None
        try:
            self.check(request)
        except (TypeError, AttributeError, ValueError) as e:  # fields of the wrong JSON type
            raise RequestRefused(f"malformed step request: {type(e).__name__}: {e}") from None
        return request

    def check(self, request: StepRequest) -> None:
        """Refuse a request naming code or an output store outside this worker's allowance."""
        pointer = request.code_pointer
        # Resolved for every request (symlinks included), with os.path rather than pathlib:
        # this runs once per step on every worker.
        file = os.path.realpath(pointer.file) if pointer.file else None
        if file is not None and os.path.splitext(file)[1] != ".py":
            raise RequestRefused(f"code pointer -f {pointer.file}: not a Python file (.py)")
        if pointer.module is not None and not _MODULE.match(pointer.module):
            raise RequestRefused(f"code pointer -m {pointer.module!r}: not a module name")
        if not any(loc.allows(file, pointer.module) for loc in self.code_locations):
            allowed = ", ".join(map(str, self.code_locations)) or "none"
            raise RequestRefused(
                f"code pointer {pointer.describe()} is outside this worker's code locations ({allowed}; from "
                f"{self.source}); start the worker with --code-location, or add it to step_worker.code_locations "
                "in its runyard.yaml"
            )
        store = request.output_store
        if not isinstance(store, str) or not any(store_within(normalize_store(store), root)
                                                 for root in self.output_stores):
            allowed = ", ".join(self.output_stores) or "none"
            raise RequestRefused(
                f"output store {store!r} is not one of this worker's output stores ({allowed}; from "
                f"{self.source}); start the worker with --output-store, or set step_worker.output_stores "
                "in its runyard.yaml"
            )
        for param, refs in request.inputs.items():
            for ref in [refs] if isinstance(refs, str) else list(refs):
                _check_ref(ref, param)


def policy_from_grant(key: bytes, grant: Mapping[str, Any], *, source: str) -> WorkerPolicy:
    """The policy of a worker the engine started itself, from the allowance it was given
    (`grant_for_run`): that run's code location and output store, and the run's key."""
    locations = tuple(CodeLocation.parse(str(t), base=None, where=f"{source}: code_locations")
                      for t in grant.get("code_locations") or ())
    stores = tuple(normalize_store(str(s)) for s in grant.get("output_stores") or ())
    return WorkerPolicy(code_locations=locations, output_stores=stores, signing_key=key, source=source)


def grant_for_run(request: StepRequest) -> dict[str, Any]:
    """JSON of the allowance an engine gives the workers it starts itself for the run of
    ``request``: the folder of its job file (or its module) and its output store. E.g. the
    environment variable RUNYARD_STEP_WORKER of a container the engine starts."""
    pointer = request.code_pointer
    location = str(Path(pointer.file).resolve().parent) if pointer.file else pointer.module
    return {"code_locations": [location], "output_stores": [request.output_store]}


def load_worker_policy(
    *,
    instance: Instance | None = None,
    code_locations: Sequence[str] = (),
    output_stores: Sequence[str] = (),
    default_code_locations: Sequence[str] = (),
    require_signature: bool = True,
) -> WorkerPolicy:
    """A worker's policy from its own side, never from a request.

    Code locations and output stores: the ones given (command-line options) if any, else the
    ``RUNYARD_STEP_WORKER`` environment variable if set, else ``step_worker`` in the
    instance's runyard.yaml; code locations default to ``default_code_locations`` (e.g. the
    modules a Celery worker imports at start), output stores to the instance's ``outputs``.
    The key: see `configured_signing_key`. Raises ConfigError for bad settings.
    """
    if instance is None:
        from .instance import Instance

        instance = Instance.from_env()
    settings = instance_settings(instance)
    base = instance.home
    source = instance.config_source
    env = os.environ.get(STEP_WORKER_ENV)
    env_data: Mapping[str, Any] = {}
    if env:
        try:
            env_data = json.loads(env)
            if not isinstance(env_data, Mapping):
                raise ValueError("expected a JSON object")
            for name in ("code_locations", "output_stores"):
                value = env_data.get(name, [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name}: expected a list of strings")
        except ValueError as e:
            raise ConfigError(
                f"environment variable {STEP_WORKER_ENV}: {e}; expected JSON like "
                '{"code_locations": ["/srv/jobs"], "output_stores": ["/srv/outputs"]}'
            ) from None
    if code_locations:
        locs, where, loc_base = list(code_locations), "--code-location", Path.cwd()
    elif "code_locations" in env_data:
        locs, where, loc_base = list(env_data["code_locations"]), f"{STEP_WORKER_ENV}.code_locations", Path.cwd()
    elif settings.code_locations:
        locs, where, loc_base = settings.code_locations, f"{source}: step_worker.code_locations", base
    else:
        locs, where, loc_base = list(default_code_locations), "default code locations", Path.cwd()
    if output_stores:
        stores, origin = list(output_stores), "--output-store"
    elif "output_stores" in env_data:
        stores, origin = list(env_data["output_stores"]), f"{STEP_WORKER_ENV}.output_stores"
    elif settings.output_stores is not None:
        stores = [s if "://" in s or Path(s).is_absolute() or base is None else str(base / s)
                  for s in settings.output_stores]
        origin = f"{source}: step_worker.output_stores"
    else:
        stores = [instance.outputs_url] if instance.outputs_url else []
        origin = f"{source}: outputs"
    parsed = tuple(CodeLocation.parse(t, base=loc_base, where=where) for t in locs)
    return WorkerPolicy(
        code_locations=parsed,
        output_stores=tuple(normalize_store(str(s)) for s in stores),
        signing_key=configured_signing_key(instance),
        require_signature=require_signature,
        source=f"{where}; output stores from {origin}",
    )


# -- running what was admitted ---------------------------------------------------------------


def refusal_event(payload: Any, reason: str) -> Event:
    """The STEP_FAILURE (NOT_STARTED) of a refused request, naming the attempt it claims to be."""
    data = payload if isinstance(payload, Mapping) else {}
    if isinstance(payload, str | bytes):
        try:
            loaded = json.loads(payload)
            data = loaded if isinstance(loaded, Mapping) else {}
        except ValueError:
            pass

    def text(name: str) -> str | None:
        value = data.get(name)
        return value if isinstance(value, str) else None

    attempt = data.get("attempt")
    return Event(
        type=EventType.STEP_FAILURE,
        run_id=text("run_id") or "?",
        step_key=text("step_key"),
        attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        attempt_id=text("attempt_id"),
        message=f"step request refused by the worker: {reason}",
        data={"failure": FailureInfo(kind=FailureKind.NOT_STARTED,
                                     message=f"step request refused by the worker: {reason}",
                                     error_class=f"{__name__}.RequestRefused").to_dict()},
    )


def admit_or_refuse(policy: WorkerPolicy, payload: Mapping[str, Any] | str) -> StepRequest | Event:
    """The admitted request, or the refusal event to report instead."""
    try:
        return policy.admit(payload)
    except RequestRefused as e:
        return refusal_event(payload, str(e))


def execute_trusted_step(
    payload: Mapping[str, Any] | str,
    policy: WorkerPolicy,
    *,
    capture_output: bool = True,
    on_event: Callable[[Event], None] | None = None,
    run: Callable[..., list[Event]] | None = None,
) -> list[Event]:
    """`runyard.plugin.execute_step` for a request from across a boundary: run it if ``policy``
    admits it; otherwise import and unpickle nothing and report one STEP_FAILURE saying why.

    ``run`` replaces `execute_step` (a worker wrapping it, e.g. in a step thread).
    """
    admitted = admit_or_refuse(policy, payload)
    if isinstance(admitted, Event):
        if on_event is not None:
            on_event(admitted)
        return [admitted]
    if run is not None:
        return run(admitted)
    from .worker import execute_step

    return execute_step(admitted, capture_output=capture_output, on_event=on_event)
