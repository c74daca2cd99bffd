"""One step attempt as one Kubernetes Job, from creation to deletion, on a thread of its own.

The life of an attempt (`JobRunner.run`):

1. The Job is created (labelled with instance, run id, step key, attempt); a refusal by the
   API server is NOT_STARTED with its message.
2. Until its pod runs, watchdogs decide: no pod within ``pod_creation_timeout`` (the Job's
   Events say why: FailedCreate, e.g. a missing ServiceAccount), unschedulable or Pending
   past ``pending_timeout``, a terminal image error (`TERMINAL_WAITING`) at once, a back-off
   image error (`BACKOFF_WAITING`) past ``image_pull_timeout``: NOT_STARTED with the
   Event's or the container's message, and the Job is deleted.
3. While the pod runs, its log is followed and each line becomes an event (the step worker
   prints one JSON event per line); a log stream that breaks is opened again and the lines
   already read are skipped.
4. Once the pod has ended, its full log (up to `MAX_LOG` bytes) is read *before anything is
   deleted*, so nothing is lost to a cut stream: the pod carries `LOG_FINALIZER`, so even a
   TTL of 0 cannot remove it (and its log) sooner; then the outcome is recorded: the worker's
   own ending, or a failure from the container's state (OOMKilled: OOM; exit 128+N: SIGNAL;
   evicted, or deleted from outside: WORKER_LOST; ...). The first outcome recorded wins, and
   a Job gone after it (a TTL of 0) is not a failure.
5. The Job is deleted: with foreground propagation when it was stopped (cancel, timeout),
   its pods ended before the attempt ends. Whatever carries the attempt's labels is swept,
   and the finalizer is taken off its pods.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from runyard.plugin import (
    Event,
    EventType,
    FailureInfo,
    FailureKind,
    StepRequest,
    StreamedAttempt,
    signal_name,
)

from ._k8s import ApiError, Cluster, LogStream, Unreachable
from .monitor import PodWatcher
from .settings import LOG_FINALIZER, label_value

TERMINAL_WAITING = frozenset({"ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError",
                              "CreateContainerError", "RunContainerError"})
BACKOFF_WAITING = frozenset({"ImagePullBackOff", "ErrImagePull", "RegistryUnavailable"})
MAX_LOG = 64 << 20  # bytes of a pod's log read after it ended
_TAIL = 1500  # characters of the log quoted in a failure


class Attempt(StreamedAttempt):
    """The state of one attempt: what has been read from its pod (reported in order by
    `StreamedAttempt.update`), how it was stopped, how it ended."""

    def __init__(self, request: StepRequest, job: dict[str, Any]) -> None:
        super().__init__(request)
        self.job = job  # the manifest (its name is final)
        self.stop_kind: FailureKind | None = None
        self.started = False  # the pod runs (or ran)
        self.lines_read = 0  # complete log lines turned into events
        self.tail = ""
        self.thread: threading.Thread | None = None
        self.created = False
        self.over = False  # nothing of the step runs any more, and its log is read

    @property
    def key(self) -> str:
        return self.request.step_key

    @property
    def name(self) -> str:
        return str(self.job["metadata"]["name"])

    @property
    def label(self) -> str:
        return label_value(self.request.attempt_id)

    def take_line(self, line: bytes) -> None:
        """One log line (under ``lock``): the worker's JSON events as they are; anything
        else is what the worker's process itself wrote (start-up errors, warnings), kept as
        stderr, which `update` holds until the step's STEP_START."""
        self.lines_read += 1
        text = line.decode("utf-8", errors="replace")
        if not text.strip():
            return
        try:
            ev = Event.from_json(text)
        except (ValueError, KeyError, TypeError):
            self.tail = (self.tail + text + "\n")[-_TAIL:]
            self.add_stderr(text + "\n")
            return
        if ev.attempt_id != self.request.attempt_id:
            return
        if ev.type is EventType.STEP_STDERR or ev.type is EventType.STEP_STDOUT:
            self.tail = (self.tail + str(ev.data.get("text", "")))[-_TAIL:]
        self.take(ev)  # an ending is held back until the pod has ended: nothing may follow it


def container_state(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, lastState) of the pod's runyard container."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == "runyard":
            return cs.get("state") or {}, cs.get("lastState") or {}
    return {}, {}


def pod_ended(pod: dict[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    state, _ = container_state(pod)
    return phase in ("Succeeded", "Failed") or "terminated" in state


def pod_ran(pod: dict[str, Any]) -> bool:
    """Whether the pod's container started (it runs, or ran and ended)."""
    state, last = container_state(pod)
    return "running" in state or "terminated" in state or bool(last)


def describe_exit(code: int | None, reason: str | None) -> str:
    if reason == "OOMKilled":
        return f"was killed for exceeding its memory limit (OOMKilled, exit code {code})"
    if code is not None and code > 128:
        return f"was killed by {signal_name(code - 128)} (exit code {code})"
    return f"exited with code {code}" + (f" ({reason})" if reason and reason not in ("Error", "Completed") else "")


def outcome_of(att: Attempt, pod: dict[str, Any] | None, deleted: bool) -> FailureInfo | None:
    """Why an attempt whose worker reported no ending failed (None: it reported one)."""
    if att.ending is not None:
        failed = att.ending.failure
        if not (failed is not None and failed.kind is FailureKind.CANCELED and att.stop_kind is None):
            return None
        # The worker reports CANCELED only on SIGTERM, and runyard did not send one (it
        # stops a step by deleting its Job, with stop_kind set): the pod was stopped from
        # outside (deleted, evicted). The step was lost, not canceled.
        att.ending = None
        deleted = True
    tail = att.tail.strip()
    said = f"; last output:\n{tail}" if tail else ""
    where = f"pod of Job {att.name} (step '{att.key}')"
    if att.stop_kind is not None:
        return FailureInfo(kind=att.stop_kind, message=f"step '{att.key}' was stopped ({att.stop_kind.value}); "
                           f"its Job {att.name} was deleted")
    status = (pod or {}).get("status") or {}
    if deleted or pod is None:
        return FailureInfo(kind=FailureKind.WORKER_LOST,
                           message=f"the {where} was deleted from outside runyard (eviction, an autoscaler, "
                           f"kubectl delete) before the step ended{said}")
    if status.get("reason") == "Evicted":
        return FailureInfo(kind=FailureKind.WORKER_LOST,
                           message=f"the {where} was evicted: {status.get('message', '')}{said}")
    if status.get("reason") == "DeadlineExceeded":
        return FailureInfo(kind=FailureKind.TIMEOUT,
                           message=f"the {where} ran past its Job's activeDeadlineSeconds{said}")
    state, _ = container_state(pod)
    term = state.get("terminated") or {}
    code = term.get("exitCode")
    reason = term.get("reason")
    if reason == "OOMKilled":
        limit = (((pod.get("spec") or {}).get("containers") or [{}])[0].get("resources") or {}).get("limits", {})
        shown = f" of {limit['memory']}" if limit.get("memory") else ""
        return FailureInfo(kind=FailureKind.OOM,
                           message=f"the {where} {describe_exit(code, reason)}{shown}; raise resources.limits.memory "
                           f"or the step's 'runyard/resources' tag{said}", exit_code=code, signal=9)
    if isinstance(code, int) and code > 128:
        return FailureInfo(kind=FailureKind.SIGNAL, message=f"the {where} {describe_exit(code, reason)}{said}",
                           exit_code=code, signal=code - 128)
    if not att.started_step:
        return FailureInfo(kind=FailureKind.NOT_STARTED,
                           message=f"the {where} {describe_exit(code, reason)} before the step started; the image "
                           f"must hold runyard (python3 -m runyard api execute-step){said}", exit_code=code)
    return FailureInfo(kind=FailureKind.WORKER_LOST,
                       message=f"the {where} {describe_exit(code, reason)} without reporting an ending{said}",
                       exit_code=code)


class JobRunner:
    """Runs attempts as Jobs in ``namespace``; ``changed`` is set whenever one has news."""

    def __init__(self, cluster: Cluster, watcher: PodWatcher, namespace: str, settings: Any,
                 changed: threading.Event) -> None:
        self.cluster = cluster
        self.watcher = watcher
        self.namespace = namespace
        self.settings = settings
        self.changed = changed

    # -- the attempt's thread ------------------------------------------------------------

    def run(self, att: Attempt) -> None:
        failure: FailureInfo | None = None
        stopped_job = False
        try:
            failure, stopped_job = self._run(att)
        except Exception as e:  # noqa: BLE001 - whatever broke, the attempt must end and say why
            failure = FailureInfo(kind=FailureKind.WORKER_LOST,
                                  message=f"lost track of step '{att.key}' (Job {att.name}): {type(e).__name__}: {e}")
        finally:
            if att.over:
                # Nothing of the attempt runs any more and its log is read: over now; the
                # clean-up below (the run's teardown waits for it) need not hold its slot.
                self.finish(att, failure)
            if att.created:
                everywhere = stopped_job or failure is not None
                try:
                    # The log is read (or no longer wanted): the pods may go. Before the
                    # deletion, so a deletion with no grace removes a pod that never ran at once.
                    self._release(att, everywhere=everywhere)
                except Exception:  # noqa: BLE001 - the run's teardown releases by label
                    pass
                try:
                    # A pod that never ran (or a replacement for one deleted from outside) has no
                    # process to stop: removed at once, since the kubelet finalizes a deletion of a
                    # pod in image back-off only at its next sync (~40 s on 1.20).
                    never_ran = failure is not None and failure.kind in (FailureKind.NOT_STARTED,
                                                                         FailureKind.WORKER_LOST)
                    self._delete(att, foreground=everywhere, force_pods=never_ran)
                    if everywhere:
                        self._release(att, everywhere=True)  # a pod made while this went on
                except Exception:  # noqa: BLE001 - the run's teardown sweeps by label
                    pass
            if not att.over:
                self.finish(att, failure)

    def finish(self, att: Attempt, failure: FailureInfo | None) -> None:
        with att.lock:
            if att.done:
                return
            if att.ending is None and att.failure is None:
                att.failure = failure  # the first outcome recorded wins
            att.done = True
        self.changed.set()

    def _stopped(self, att: Attempt) -> FailureKind | None:
        with att.lock:
            return att.stop_kind

    def _run(self, att: Attempt) -> tuple[FailureInfo | None, bool]:
        if self._stopped(att) is not None:
            return FailureInfo(kind=att.stop_kind or FailureKind.CANCELED,
                               message=f"step '{att.key}' was stopped before its Job was created"), False
        for tries in range(1, 4):
            try:
                self.cluster.create_job(self.namespace, att.job)
                break
            except ApiError as e:
                if e.status == 409 and tries > 1:
                    break  # the connection broke after the server had made it: the name is the attempt's own
                why = e.message or e
                return FailureInfo(kind=FailureKind.NOT_STARTED,
                                   message=f"the API server refused the Job of step '{att.key}': {why}"), False
            except Unreachable as e:
                # A pooled connection the server had closed (reset by peer), a blip: again,
                # unless it keeps failing.
                if tries == 3:
                    return FailureInfo(kind=FailureKind.NOT_STARTED,
                                       message=f"could not create the Job of step '{att.key}' (3 tries): {e}"), False
                time.sleep(0.5 * tries)
        att.created = True
        created_at = time.monotonic()
        s = self.settings
        backoff_since: float | None = None
        stream: _Follower | None = None
        while True:
            kind = self._stopped(att)
            if kind is not None:
                return self._stop(att, stream), True
            pods, gone = self.watcher.of(att.label)
            now = time.monotonic()
            ended = [p for p in pods + gone if pod_ended(p)]
            if ended:
                # The terminal state is recorded from the watch even when the pod is gone
                # already (a TTL of 0 deleted its Job): what was streamed is then all there is.
                if not att.started:
                    self._started(att)
                if stream is not None:
                    stream.stop()
                self._final_log(att, ended[0])
                att.over = True
                with att.lock:
                    return outcome_of(att, ended[0], False), False
            outside = gone + [p for p in pods if (p.get("metadata") or {}).get("deletionTimestamp")]
            if outside:
                # Deleted from outside while it ran (runyard deletes only after an outcome):
                # the worker may report CANCELED on its SIGTERM, yet the step was lost.
                if stream is not None:
                    stream.stop()
                with att.lock:
                    if att.ending is not None and att.ending.type is not EventType.STEP_SUCCESS:
                        att.ending = None
                    return outcome_of(att, outside[0], True), True
            if not pods:
                if now - created_at > s.pod_creation_timeout:
                    return self._no_pod(att), True
                self.watcher.wait(0.5)
                continue
            pod = pods[0]
            status = pod.get("status") or {}
            state, _ = container_state(pod)
            waiting = state.get("waiting") or {}
            reason = waiting.get("reason")
            if "running" in state:
                if not att.started:
                    self._started(att)
                if stream is None:
                    stream = _Follower(self, att, pod["metadata"]["name"])
                    stream.start()
                elif not stream.alive():
                    stream = _Follower(self, att, pod["metadata"]["name"])  # the stream broke: again
                    stream.start()
                self.watcher.wait(0.5)
                continue
            # Pending: not scheduled, pulling, creating.
            if reason in TERMINAL_WAITING:
                return self._not_started(att, pod, f"{reason}: {waiting.get('message', '')}"), True
            if reason in BACKOFF_WAITING:
                backoff_since = backoff_since or now
                if now - backoff_since > s.image_pull_timeout:
                    return self._not_started(att, pod, f"{reason} for more than {s.image_pull_timeout:g}s "
                                                       f"(image_pull_timeout): {waiting.get('message', '')}"), True
            else:
                backoff_since = None
            if now - created_at > s.pending_timeout:
                why = _unschedulable(status) or self._events_message(att, "Pod", pod["metadata"]["name"]) or \
                    f"still {status.get('phase', 'Pending')}{f' ({reason})' if reason else ''}"
                return self._not_started(att, pod, f"Pending for more than {s.pending_timeout:g}s "
                                                   f"(pending_timeout): {why}"), True
            self.watcher.wait(0.5)

    def _started(self, att: Attempt) -> None:
        with att.lock:
            att.started = True
        self.changed.set()

    def _not_started(self, att: Attempt, pod: dict[str, Any], why: str) -> FailureInfo:
        return FailureInfo(kind=FailureKind.NOT_STARTED,
                           message=f"the pod of step '{att.key}' (Job {att.name}, image "
                           f"{_image(pod)}) never started: {why}")

    def _no_pod(self, att: Attempt) -> FailureInfo:
        why = self._events_message(att, "Job", att.name)
        return FailureInfo(kind=FailureKind.NOT_STARTED,
                           message=f"Job {att.name} of step '{att.key}' made no pod within "
                           f"{self.settings.pod_creation_timeout:g}s (pod_creation_timeout)"
                           + (f": {why}" if why else ""))

    def _events_message(self, att: Attempt, kind: str, name: str) -> str:
        try:
            events = self.cluster.events_for(self.namespace, kind, name)
        except (ApiError, Unreachable):
            return ""
        warnings = [e for e in events if e.get("type") == "Warning"] or events
        if not warnings:
            return ""
        last = warnings[-1]
        return f"{last.get('reason', '')}: {last.get('message', '')}".strip(": ")

    def _final_log(self, att: Attempt, pod: dict[str, Any] | None) -> None:
        """Read the whole log of the ended pod and take the lines not read yet."""
        if pod is None:
            return
        try:
            text = self.cluster.pod_log(self.namespace, pod["metadata"]["name"], limit_bytes=MAX_LOG)
        except (ApiError, Unreachable):
            return  # the pod is gone: what was streamed is all there is
        lines = text.encode().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        with att.lock:
            for line in lines[att.lines_read:]:
                att.take_line(line)
        self.changed.set()

    def _stop(self, att: Attempt, stream: _Follower | None) -> FailureInfo:
        """Delete the Job (foreground: its pods first) and wait until the step is over: its
        worker reported its ending (read from the pod's log, which the kubelet serves
        before its status catches up, seconds later on a loaded node), or its pods ended
        (or, for a pod that never ran, are gone), or, one second past ``terminate_grace``,
        its container's processes were killed through exec. What the pod logged is kept."""
        kind = att.stop_kind or FailureKind.CANCELED
        if stream is not None:
            stream.stop()  # from here on the log is read below, by polling: no line twice
        self._delete(att, foreground=True)
        deadline = time.monotonic() + self.settings.terminate_grace + 20
        # Past the grace, the kubelet has had its chance: it stops a deleted pod and reports
        # it ended, but on the test cluster, even quiet, it took 8-13 s after a 2 s grace
        # while a step that ignores SIGTERM beat on (the kit's cancel test), or reported a
        # running container as waiting throughout. So the step's processes are killed
        # through exec, which the kubelet serves at once, off its pod workers.
        kill_at: float | None = time.monotonic() + self.settings.terminate_grace + 1
        released: set[str] = set()
        ended: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            self.watcher.refresh()
            pods, _ = self.watcher.of(att.label)
            ended = [p for p in pods if pod_ended(p)]
            live = [p for p in pods if not pod_ended(p)]
            for pod in live:
                name = pod["metadata"]["name"]
                if not pod_ran(pod) and name not in released:
                    # No log to keep yet: its deletion may finish (it is gone once its
                    # container, should it have been starting, is stopped).
                    released.add(name)
                    self.cluster.remove_finalizer(self.namespace, name, LOG_FINALIZER, known=pod)
            if not live:
                att.over = bool(ended)  # (no pod yet: one may still be made; swept first)
                break
            self._final_log(att, live[0])  # what the worker wrote since: its ending, once it has one
            with att.lock:
                if att.ending is not None:
                    att.over = True  # the step returned or raised; the pod's deletion finishes it
                    break
            if kill_at is not None and time.monotonic() >= kill_at:
                kill_at = None  # once: should exec fail, the pod's end is waited for as before
                killed = [self.cluster.kill_in_pod(self.namespace, p["metadata"]["name"]) for p in live]
                if any(killed):
                    # Every process of the container but its shell got SIGKILL: the step is over.
                    self._final_log(att, live[0])
                    att.over = True
                    break
            self.watcher.wait(0.3)
        if ended:
            self._final_log(att, ended[0])
        return FailureInfo(kind=kind, message=f"step '{att.key}' was stopped ({kind.value}): its Job {att.name} "
                           "was deleted")

    def _release(self, att: Attempt, *, everywhere: bool) -> None:
        """Take the log finalizer off the attempt's pods: those the watch knows, or (after
        a stop or a failure, when a pod may have been made meanwhile) every pod by label."""
        if everywhere:
            from .manifest import attempt_selector

            self.cluster.release_pods(self.namespace, attempt_selector(att.request.run_id, att.request.attempt_id),
                                      LOG_FINALIZER)
            return
        pods, _ = self.watcher.of(att.label)
        for pod in pods:
            if LOG_FINALIZER in ((pod.get("metadata") or {}).get("finalizers") or []):
                self.cluster.remove_finalizer(self.namespace, pod["metadata"]["name"], LOG_FINALIZER, known=pod)

    def _delete(self, att: Attempt, *, foreground: bool, force_pods: bool = False) -> None:
        grace = int(self.settings.terminate_grace) if foreground else 0
        if force_pods:
            from .manifest import attempt_selector

            self.cluster.delete_pods(self.namespace, attempt_selector(att.request.run_id, att.request.attempt_id),
                                     grace=0)
        self.cluster.delete_job(self.namespace, att.name, propagation="Foreground" if foreground else "Background",
                                grace=grace)
        if foreground:
            # A pod the Job controller made while the delete was on its way: by label.
            from .manifest import attempt_selector

            self.cluster.delete_pods(self.namespace, attempt_selector(att.request.run_id, att.request.attempt_id),
                                     grace=grace)


class _Follower:
    """Follows a running pod's log on a thread, skipping the lines already read."""

    def __init__(self, runner: JobRunner, att: Attempt, pod_name: str) -> None:
        self.runner = runner
        self.att = att
        self.pod_name = pod_name
        self.stream: LogStream | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"runyard-k8s-log-{att.key}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        """No line is taken after this returns (the thread checks ``stopped`` under the
        attempt's lock); the thread itself ends once its read is cut."""
        self.stopped.set()
        stream = self.stream
        if stream is not None:
            stream.close()
        self.thread.join(1.0)

    def _run(self) -> None:
        att = self.att
        try:
            self.stream = self.runner.cluster.follow_log(self.runner.namespace, self.pod_name)
        except (ApiError, Unreachable):
            time.sleep(0.5)  # not ready yet, or the connection broke: the runner starts another
            return
        if self.stopped.is_set():
            self.stream.close()
            return
        with att.lock:
            skip = att.lines_read
        seen = 0
        for line in self.stream.lines():
            if self.stopped.is_set():
                break
            seen += 1
            if seen <= skip:
                continue
            with att.lock:
                if self.stopped.is_set():
                    break
                att.take_line(line)
            self.runner.changed.set()
        self.stream.close()


def _unschedulable(status: dict[str, Any]) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}"
    return ""


def _image(pod: dict[str, Any]) -> str:
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return str(containers[0].get("image", "?"))
