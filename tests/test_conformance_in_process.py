"""The built-in in-process executor passes the conformance kit."""

from runyard.testing.conformance import ExecutorConformance


class TestInProcessConformance(ExecutorConformance):
    executor = "in_process"
