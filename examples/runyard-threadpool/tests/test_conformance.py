"""The threadpool executor passes runyard's executor conformance kit.

The timeout and cancel tests are skipped: the spec declares enforces_timeouts=False and
can_terminate=False, and the kit names the missing capability in the skip reason.
"""

from runyard.testing.conformance import ExecutorConformance


class TestThreadPoolConformance(ExecutorConformance):
    executor = "threadpool"
    executor_config = {"max_concurrent": 4}
