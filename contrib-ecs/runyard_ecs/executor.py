"""The ``ecs`` executor: each step attempt in an ECS task of its own.

Per attempt, a thread of the run worker calls RunTask (retried, see `_aws`) with the step
worker as the container's command, ``runyard api execute-step --stream REQUEST``, the
request signed with a key made for the run and the run's allowance in the environment
(as the Docker executor does; see docs/security.md). It then follows the task: it reads
the new lines of the task's CloudWatch Logs stream and DescribeTasks, a tenth of a second
after anything changed and less often while nothing does, at most ``poll_interval``
apart. Log lines are the step worker's events, one JSON line each; any other line is the
worker's own stderr (a crash before the step started) and becomes STEP_STDERR, held until
the step's STEP_START has been read (or the task is over). The step's ending is held back
until the task has STOPPED, and once it has, the log is read until the ending arrives (log
delivery lags) or ``LOG_DRAIN`` seconds pass.

A task that ends without its step reporting an ending fails with a kind read from ECS:
NOT_STARTED for TaskFailedToStart (the reason says why: a missing image, a secret that
cannot be read) or for a task stuck before RUNNING beyond ``start_timeout`` (stopped), OOM
for an OutOfMemoryError stop, SIGNAL for exit code 128+N, WORKER_LOST for a task with no
exit code or one ECS stopped knowing (MISSING for ``missing_grace`` seconds). Timeouts and
cancellation are StopTask.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from runyard import ConfigError
from runyard.plugin import (
    SIGNING_KEY_ENV,
    STEP_WORKER_ENV,
    Event,
    EventType,
    FailureInfo,
    FailureKind,
    StepHandler,
    StepRequest,
    StepUpdate,
    StreamedAttempt,
    grant_for_run,
    new_signing_key,
    resolve,
    sign_request,
)

from . import tasks
from ._aws import AwsError, error_types
from .common import TaskDefinition, connect, log_stream, start_task, supervised, task_definition
from .settings import OVERRIDES_TAG, STARTED_BY_PREFIX, STEP_OVERRIDE_KEYS, TAG_STEP_KEY, EcsExecutorConfig

# Seconds to wait for the log's last lines after the task stopped: a clean exit (0) means
# the worker wrote an ending, which is worth waiting for; a crash may have written none.
LOG_DRAIN = 10.0
LOG_DRAIN_CRASHED = 2.0
# A step's follower polls FIRST_POLL seconds after a change, then POLL_GROWTH times longer
# each quiet round, up to poll_interval: a no-op step's end is seen within a tenth of a
# second, and a long step costs one DescribeTasks and one log read per poll_interval.
FIRST_POLL = 0.1
POLL_GROWTH = 1.5
_MAX_REQUEST = 7000  # RunTask's overrides hold at most 8 KiB of text in all
_TAIL = 1500
_MAX_EVENT_LINE = 16 << 20  # characters of one split event line joined back at most


def step_overrides(request: StepRequest, where: str) -> dict[str, Any]:
    """The step's ``runyard/ecs`` tag: a JSON object of per-step overrides."""
    raw = (request.tags or {}).get(OVERRIDES_TAG)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"step '{request.step_key}': tag {OVERRIDES_TAG}: not JSON ({e}); write e.g. "
                          '{"cpu": 512, "memory": 1024}') from None
    if not isinstance(value, dict):
        raise ConfigError(f"step '{request.step_key}': tag {OVERRIDES_TAG}: expected a JSON object, got {raw!r}")
    unknown = sorted(set(value) - set(STEP_OVERRIDE_KEYS))
    if unknown:
        raise ConfigError(f"step '{request.step_key}': tag {OVERRIDES_TAG}: unknown key {unknown[0]!r}; "
                          f"known: {', '.join(STEP_OVERRIDE_KEYS)}")
    if "env_vars" in value and not isinstance(value["env_vars"], dict):
        raise ConfigError(f"step '{request.step_key}': tag {OVERRIDES_TAG}.env_vars: expected an object")
    return value


class Attempt(StreamedAttempt):
    """One step attempt's task and what has been read from it (the events and stderr,
    reported in order by `StreamedAttempt.update`)."""

    def __init__(self, request: StepRequest, overrides: dict[str, Any]) -> None:
        super().__init__(request)
        self.overrides = overrides
        self.task_arn: str | None = None
        self.stop_kind: FailureKind | None = None
        self.stderr_tail = ""
        self.stderr_total = 0
        self.partial = ""
        self.thread: threading.Thread | None = None

    def take_line(self, line: str) -> None:
        """One log line: an event of this attempt, or the worker's own stderr. Docker's log
        drivers split lines longer than 16 KiB (and CloudWatch events are at most 256 KiB):
        an event line that does not parse is joined with the lines after it until it does."""
        ev: Event | None = None
        if self.partial:
            line, self.partial = self.partial + line, ""
        try:
            ev = Event.from_json(line)
        except (ValueError, KeyError, TypeError):
            if line.startswith('{"') and len(line) < _MAX_EVENT_LINE:
                self.partial = line
                return
        with self.lock:
            if ev is None:
                if not line.strip():
                    return
                self.stderr_tail = (self.stderr_tail + line + "\n")[-_TAIL:]
                self.add_stderr(line + "\n")  # held by `update` until the step's STEP_START
                self.stderr_total += 1
                return
            if ev.attempt_id != self.request.attempt_id:
                return
            if ev.type is EventType.STEP_STDERR:
                self.stderr_tail = (self.stderr_tail + str(ev.data.get("text", "")))[-_TAIL:]
            self.take(ev)  # an ending is held back until the task has stopped: nothing may follow it


class EcsStepHandler(StepHandler):
    """Runs every step attempt in an ECS task of its own (see the module docstring)."""

    config: EcsExecutorConfig

    def __init__(self, config: EcsExecutorConfig, context: Any) -> None:
        super().__init__(config, context)
        self.api: Any = None
        self.changed = threading.Event()
        self.lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.definitions: dict[str, TaskDefinition] = {}
        self.signing_key = ""
        self.where = context.where() if hasattr(context, "where") else "executor.ecs"

    def setup(self) -> None:
        self.api = connect(self.config, self.where)
        self.signing_key = self._signing_key()
        # Registered (or described) once per run, before any step: a wrong image or role is
        # reported before the first step instead of by each.
        self._definition({})

    def _signing_key(self) -> str:
        """The key step requests are signed with: the value of ``signing_key_secret``, which
        ECS gives the step tasks from their task definition's ``secrets``; or, only with
        ``secrets_in_overrides``, a key made for this run and passed in RunTask's overrides."""
        cfg = self.config
        if cfg.signing_key_secret:
            key = self.api.secret_value(str(resolve(cfg.signing_key_secret)), "signing_key_secret").strip()
            if len(key) < 16:
                raise ConfigError(f"{self.where}.signing_key_secret: the secret holds {len(key)} characters; a "
                                  "signing key needs at least 16 (e.g. the output of: openssl rand -hex 32)")
            return key
        if cfg.secrets_in_overrides:
            return new_signing_key()
        raise ConfigError(
            f"{self.where}.signing_key_secret: required: the step tasks need the signing key of their requests, and "
            "anything in RunTask's overrides can be read by whoever may call DescribeTasks; give the ARN of a "
            "Secrets Manager secret (or a Parameter Store SecureString) holding a random key, or, for an emulator "
            "or a trusted account only, set secrets_in_overrides: true")

    def _definition(self, overrides: dict[str, Any]) -> TaskDefinition:
        key = json.dumps({k: overrides.get(k) for k in ("image", "task_definition")}, sort_keys=True)
        with self.lock:
            known = self.definitions.get(key)
        if known is not None:
            return known
        td = task_definition(self.api, self.config, self.where, image=overrides.get("image"),
                             existing=overrides.get("task_definition"))
        with self.lock:
            self.definitions[key] = td
        return td

    # -- the handler contract ---------------------------------------------------------

    def launch(self, request: StepRequest) -> Attempt:
        att = Attempt(request, step_overrides(request, self.where))
        att.thread = threading.Thread(target=self._follow, args=(att,), name=f"runyard-ecs-{request.step_key}",
                                      daemon=True)
        with self.lock:
            self.attempts.append(att)
        att.thread.start()
        return att

    def poll(self, handle: Attempt) -> StepUpdate:
        return handle.update(started=handle.started_step, lost=lambda: self._lost(handle, None))

    def terminate(self, handle: Attempt, kind: FailureKind) -> None:
        att = handle
        with att.lock:
            if att.stop_kind is not None or att.done:
                return
            att.stop_kind = kind
            arn = att.task_arn
        if arn is not None:
            threading.Thread(target=self._stop, args=(arn, kind), daemon=True).start()
        self.changed.set()

    def wait(self, timeout: float) -> None:
        self.changed.wait(timeout)
        self.changed.clear()

    def teardown(self) -> None:
        if self.api is None:
            return
        with self.lock:
            attempts = list(self.attempts)
        for att in attempts:
            with att.lock:
                live = att.task_arn if not att.done else None
            if live:
                self._stop(live, FailureKind.CANCELED)
        deadline = time.monotonic() + 30
        for att in attempts:
            if att.thread is not None:
                att.thread.join(max(0.0, deadline - time.monotonic()))

    # -- one attempt ----------------------------------------------------------------------

    def _stop(self, arn: str, kind: FailureKind) -> None:
        try:
            self.api.stop_task(self.config.cluster, arn, f"runyard: step {kind.value}")
        except error_types():
            pass

    def _finish(self, att: Attempt, failure: FailureInfo | None) -> None:
        with att.lock:
            if failure is not None and att.ending is None:
                att.failure = failure
            att.done = True
        self.changed.set()

    def _follow(self, att: Attempt) -> None:
        try:
            self._run(att)
        except Exception as e:  # the thread must always end the attempt
            self._finish(att, FailureInfo(kind=FailureKind.WORKER_LOST,
                                          message=f"step '{att.request.step_key}': following its ECS task failed: "
                                          f"{type(e).__name__}: {e}"))

    def _start(self, att: Attempt) -> tuple[TaskDefinition, str] | FailureInfo:
        req = att.request
        cfg = self.config
        try:
            td = self._definition(att.overrides)
        except ConfigError as e:
            return FailureInfo(kind=FailureKind.NOT_STARTED, message=str(e))
        payload = json.dumps(sign_request(req, self.signing_key.encode()), separators=(",", ":"))
        if len(payload) > _MAX_REQUEST:
            return FailureInfo(kind=FailureKind.NOT_STARTED, message=(
                f"step '{req.step_key}': its request is {len(payload)} characters, more than RunTask's overrides "
                "carry (8 KiB in all); make the run config smaller"))
        env = {**cfg.env_vars, **att.overrides.get("env_vars", {}), "PYTHONUNBUFFERED": "1",
               STEP_WORKER_ENV: json.dumps(grant_for_run(req))}
        if cfg.signing_key_secret:
            mapped = {s.get("name") for s in td.container.get("secrets") or []}
            if SIGNING_KEY_ENV not in mapped:
                return FailureInfo(kind=FailureKind.NOT_STARTED, message=(
                    f"step '{req.step_key}': task definition {td.arn} does not give its container {SIGNING_KEY_ENV} "
                    f"from secrets; add {{name: {SIGNING_KEY_ENV}, valueFrom: <signing_key_secret>}} to it"))
        else:
            env[SIGNING_KEY_ENV] = self.signing_key  # secrets_in_overrides: readable by DescribeTasks
        kwargs = tasks.run_task_kwargs(
            cfg, task_definition_arn=td.arn,
            command=supervised(["python3", "-m", "runyard", "api", "execute-step", "--stream", payload]),
            env=env, run_id=req.run_id, kind="step", extra_tags={TAG_STEP_KEY: req.step_key[:256]},
            started_by=STARTED_BY_PREFIX + req.run_id, cpu=att.overrides.get("cpu"),
            memory=att.overrides.get("memory"))
        try:
            td, task = start_task(self.api, cfg, self.where, td, kwargs, image=att.overrides.get("image"),
                                  existing=att.overrides.get("task_definition"))
        except (ConfigError, AwsError) as e:
            with self.lock:
                self.definitions.clear()  # it may name a task definition ECS no longer knows
            return FailureInfo(kind=FailureKind.NOT_STARTED,
                               message=f"step '{req.step_key}': its ECS task could not be started: {e}")
        return td, task["taskArn"]

    def _run(self, att: Attempt) -> None:
        with att.lock:
            stopped_early = att.stop_kind
        if stopped_early is not None:
            self._finish(att, self._lost(att, None))
            return
        started = self._start(att)
        if isinstance(started, FailureInfo):
            self._finish(att, started)
            return
        td, arn = started
        with att.lock:
            att.task_arn = arn
            stop_now = att.stop_kind
        if stop_now is not None:  # terminated while RunTask was on its way
            self._stop(arn, stop_now)
        stream = log_stream(td, arn)
        token: str | None = None
        cfg = self.config
        missing_since: float | None = None
        state: tasks.TaskState | None = None
        delay = FIRST_POLL
        seen: tuple[Any, ...] = ()
        while True:
            if stream is not None:
                token = self._read_log(att, stream, token)
            try:
                task, reason = self.api.describe_task(cfg.cluster, arn)
            except error_types():
                task, reason = None, None  # a transient error: ask again
            if task is not None:
                missing_since = None
                state = tasks.read_task(task, td.container["name"], start_timeout=cfg.start_timeout)
                if state.phase == "stuck":
                    self._stop(arn, FailureKind.NOT_STARTED)
                    self._finish(att, FailureInfo(kind=FailureKind.NOT_STARTED, message=(
                        f"step '{att.request.step_key}': ECS task {arn.rsplit('/', 1)[-1]} was still {state.status} "
                        f"after {cfg.start_timeout:g}s (start_timeout); runyard stopped it"
                        + (f" ({state.reason})" if state.reason else ""))))
                    return
                if state.is_over:
                    break
            elif reason is not None:
                now = time.monotonic()
                missing_since = missing_since or now
                if now - missing_since >= cfg.missing_grace:
                    self._finish(att, FailureInfo(kind=FailureKind.WORKER_LOST, message=(
                        f"step '{att.request.step_key}': ECS task {arn.rsplit('/', 1)[-1]} vanished: ECS has not "
                        f"known it ({reason}) for {now - missing_since:.0f}s (missing_grace)")))
                    return
            # Poll soon after anything changed (a new status, new lines), then less and less
            # often up to poll_interval; once the ending is in, the task is about to stop.
            with att.lock:
                now_seen = (state.status if state else None, len(att.pending), att.started_step, att.stderr_total)
                ended = att.ending is not None
            if now_seen != seen or ended:
                delay = FIRST_POLL
            else:
                delay = min(delay * POLL_GROWTH, cfg.poll_interval)
            seen = now_seen
            time.sleep(min(delay, cfg.poll_interval))
        # Stopped: its last lines may still be on their way to CloudWatch Logs.
        if stream is not None:
            # A clean exit means an ending was written: worth waiting for. Not after a crash,
            # nor after a stop of ours (the emulator reports exit 0 for those).
            clean = state is not None and state.exit_code == 0 and att.stop_kind is None
            deadline = time.monotonic() + (LOG_DRAIN if clean else LOG_DRAIN_CRASHED)
            while True:
                token = self._read_log(att, stream, token)
                with att.lock:
                    have_ending = att.ending is not None
                if have_ending or time.monotonic() > deadline or (state is not None and state.phase == "not_started"):
                    break
                time.sleep(0.2)
        self._finish(att, self._lost(att, state))

    def _read_log(self, att: Attempt, stream: tuple[str, str], token: str | None) -> str | None:
        try:
            lines, token = self.api.log_events(stream[0], stream[1], token)
        except error_types():
            return token
        for line in lines:
            att.take_line(line)
        if lines:
            self.changed.set()
        return token

    def _lost(self, att: Attempt, state: tasks.TaskState | None) -> FailureInfo:
        """Why a task ended without the step worker reporting an ending."""
        key = att.request.step_key
        what = f"ECS task {att.task_arn.rsplit('/', 1)[-1]}" if att.task_arn else "its ECS task"
        tail = att.stderr_tail.strip()
        said = f"; last stderr:\n{tail}" if tail else ""
        code = state.exit_code if state is not None else None
        if att.stop_kind is not None:
            return FailureInfo(kind=att.stop_kind, message=f"step '{key}' was stopped ({att.stop_kind.value})",
                               exit_code=code)
        if state is None:
            return FailureInfo(kind=FailureKind.WORKER_LOST, message=f"step '{key}': {what} ended unseen{said}")
        told = f"step '{key}': {what} {state.describe()}"
        if state.phase == "not_started":
            return FailureInfo(kind=FailureKind.NOT_STARTED, message=f"{told}{said}", exit_code=code)
        if state.phase == "oom":
            return FailureInfo(kind=FailureKind.OOM, message=f"{told}; raise memory (the setting, or cpu/memory in "
                               f"the step's {OVERRIDES_TAG} tag){said}", exit_code=code, signal=9)
        if code is not None and code > 128:
            return FailureInfo(kind=FailureKind.SIGNAL, message=f"{told}{said}", exit_code=code, signal=code - 128)
        if state.phase == "lost":
            return FailureInfo(kind=FailureKind.WORKER_LOST, message=f"{told}{said}")
        if not att.started_step:
            return FailureInfo(kind=FailureKind.NOT_STARTED, message=(
                f"{told} before the step started; the image must hold runyard (python3 -m runyard api "
                f"execute-step){said}"), exit_code=code)
        return FailureInfo(kind=FailureKind.WORKER_LOST, message=f"{told} without reporting an ending{said}",
                           exit_code=code)


__all__ = ["EcsStepHandler"]
