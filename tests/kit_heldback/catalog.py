"""The held-back variants: name, handler class, the defect, and the documented clause it breaks.

``focus`` is a pytest ``-k`` expression selecting the kit tests about that clause, by words
their names are likely to contain; `tests/test_kit_heldback.py` runs those first (cheap
verdicts for variants the kit catches) and the rest of the kit only when they pass, so the
verdict is always the whole kit's.
"""

from __future__ import annotations

from typing import NamedTuple

REFERENCE = "reference"

STOP = "terminate or timeout or cancel or stop or outlive or kill or orphan or leftover"
EVENTS = "stdout or stderr or log or event or output or capture"
CRASH = "crash or exit or signal or kill or fail"
CONCURRENCY = "concurren or same_time or overlap or parallel"
RETRY = "retr or attempt"
ORDER = "chain or fan or storage or recorded or order or output"


class Variant(NamedTuple):
    name: str
    handler: str  # class in tests.kit_heldback.variants
    defect: str  # what is wrong, one line
    clause: str  # the clause of docs/plugins.md (or issue 11) it violates
    focus: str  # a pytest -k expression: the kit tests about that clause
    probe: str  # the check in `probes` that shows the defect is real


VARIANTS: list[Variant] = [
    Variant(
        "pool_of_two", "PoolOfTwo",
        "starts at most 2 workers at a time whatever max_concurrent says; other launches wait in the handler",
        "max_concurrent: N launched steps really run at once (issue 11); an own limit is declared as "
        "Capabilities.max_concurrency",
        CONCURRENCY,
        "three_run_at_once",
    ),
    Variant(
        "terminate_by_step_key", "TerminateByStepKey",
        "terminate finds the worker by run+step name registered once: stopping a retry hits attempt 1's worker",
        "terminate(handle, kind): stop the attempt (every attempt, retries included)",
        STOP,
        "timed_out_retry_is_stopped",
    ),
    Variant(
        "terminate_before_spawn_lost", "TerminateBeforeSpawnLost",
        "workers are started from a thread; a terminate before the process exists is forgotten, the step runs",
        "terminate: stop the attempt whatever its state, right after launch included",
        STOP,
        "terminate_right_after_launch",
    ),
    Variant(
        "polite_group_stop", "PoliteGroupStop",
        "SIGKILL goes to the worker only, the group gets SIGTERM: a child ignoring SIGTERM outlives stop and run",
        "the step's process group is gone after terminate; no step process outlives the run (issue 11)",
        STOP,
        "no_child_outlives_the_run",
    ),
    Variant(
        "timeout_only_reported", "TimeoutOnlyReported",
        "claims enforces_timeouts, but terminate(TIMEOUT) only marks the attempt over; the step runs on",
        "enforces_timeouts: a step past its timeout is stopped, not just reported",
        STOP,
        "timed_out_retry_is_stopped",
    ),
    Variant(
        "forgets_finished", "ForgetsFinished",
        "drops an attempt's state once polled done: a later poll or terminate raises KeyError",
        "terminate: idempotent, copes with attempts that already ended; poll after completion is safe",
        "terminate or poll or idempotent or after_completion or safe",
        "safe_after_completion",
    ),
    Variant(
        "sigkill_is_oom", "SigkillIsOom",
        "a worker killed by SIGKILL is reported as OOM",
        "FailureKind: SIGNAL for a process killed by a signal; OOM only when known to be out of memory",
        CRASH,
        "crash_is_failure_with_its_events",
    ),
    Variant(
        "shell_wrapper_status", "ShellWrapperStatus",
        "worker runs under `sh -c` without exec: a signal death comes back as exit 128+N, WORKER_LOST",
        "FailureKind: SIGNAL with signal=N when the step's process was killed",
        CRASH,
        "crash_is_failure_with_its_events",
    ),
    Variant(
        "exit_zero_is_success", "ExitZeroIsSuccess",
        "a worker exiting 0 without an ending (os._exit(0) in the step) gets a made-up STEP_SUCCESS",
        "StepUpdate.crashed when the worker did not report an ending; a crashed step is a failure",
        CRASH,
        "crash_is_failure_with_its_events",
    ),
    Variant(
        "crash_drops_events", "CrashDropsEvents",
        "holds events until the ending and reports a crash without them: what the step printed/logged is lost",
        "StepUpdate.crashed: pass along any events you did receive",
        CRASH,
        "crash_is_failure_with_its_events",
    ),
    Variant(
        "replays_output_at_end", "ReplaysOutputAtEnd",
        "re-sends every STEP_LOG/STDOUT/STDERR of the attempt with its ending: each reported twice",
        "poll: return the events reported since the last poll (each event once)",
        EVENTS,
        "events_complete_once_in_order",
    ),
    Variant(
        "ending_first", "EndingFirst",
        "holds STEP_OUTPUT until the ending, then puts the ending first: the output is dropped",
        "events in order: ..., STEP_OUTPUT, then STEP_SUCCESS last",
        ORDER,
        "events_complete_once_in_order",
    ),
    Variant(
        "no_step_start", "NoStepStart",
        "drops the worker's STEP_START (says started=True instead)",
        "events a worker emits: STEP_START first, with pid and host",
        ORDER,
        "events_complete_once_in_order",
    ),
    Variant(
        "stderr_into_stdout", "StderrIntoStdout",
        "passes STEP_STDERR on as STEP_STDOUT",
        "captured stdout and stderr reach the events (STEP_STDOUT, STEP_STDERR)",
        EVENTS,
        "events_complete_once_in_order",
    ),
    Variant(
        "warnings_to_handler_logger", "WarningsToHandlerLogger",
        "sends WARNING+ STEP_LOG records to the handler's own logger instead of the events",
        "STEP_LOG per log record of the step",
        EVENTS,
        "events_complete_once_in_order",
    ),
    Variant(
        "drops_info_logs", "DropsInfoLogs",
        "drops STEP_LOG events below WARNING",
        "STEP_LOG per log record, at the logger's effective level",
        EVENTS,
        "events_complete_once_in_order",
    ),
    Variant(
        "log_level_flattened", "LogLevelFlattened",
        "rewrites every STEP_LOG's data to {level: INFO}, no logger",
        "STEP_LOG data: {level, logger}",
        EVENTS,
        "events_complete_once_in_order",
    ),
    Variant(
        "unterminated_tail_dropped", "UnterminatedTailDropped",
        "keeps only whole lines of STEP_STDOUT/STDERR: output without a final newline is lost",
        "whatever the step writes comes back, a line without a newline included",
        EVENTS,
        "events_complete_once_in_order",
    ),
    Variant(
        "traceback_dropped", "TracebackDropped",
        "rebuilds STEP_FAILURE without the traceback",
        "FailureInfo: error_class and traceback when known",
        "fail or traceback or error",
        "attempts_stamped_right",
    ),
    Variant(
        "attempt_id_per_step", "AttemptIdPerStep",
        "stamps events with one id per run+step: every attempt of a step has the same attempt_id",
        "attempt_id: unique per attempt; every event of the attempt carries it",
        RETRY,
        "attempts_stamped_right",
    ),
    Variant(
        "attempt_number_stuck", "AttemptNumberStuck",
        "stamps events with the first request's attempt number: a retry's events say attempt=1",
        "events carry their attempt (1 for the first try, 2 for the first retry)",
        RETRY,
        "attempts_stamped_right",
    ),
    Variant(
        "reads_after_exit", "ReadsAfterExit",
        "reads the event pipe only after the worker exits: a step writing > 64 KiB blocks forever",
        "a step is never a hang (RULES); poll returns the events reported since the last poll",
        EVENTS,
        "big_output_does_not_hang",
    ),
    Variant(
        "wait_zero_blocks", "WaitZeroBlocks",
        "wait(timeout) is event.wait(timeout or None): wait(0) blocks until a step reports",
        "wait: block at most timeout seconds",
        "wait",
        "wait_zero_returns",
    ),
]
