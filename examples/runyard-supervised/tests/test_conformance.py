"""The supervised launcher passes runyard's run-launcher conformance kit."""

from runyard.testing.launchers import RunLauncherConformance


class TestSupervisedConformance(RunLauncherConformance):
    launcher = "supervised"
    launcher_config = {"nice": 5}


class TestSupervisedWithRuntimeLimit(RunLauncherConformance):
    # A limit far above what the kit's runs take must change nothing.
    launcher = "supervised"
    launcher_config = {"max_runtime": 600, "terminate_grace": 2}
