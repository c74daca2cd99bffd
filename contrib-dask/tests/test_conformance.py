"""The conformance kit against real Dask: a temporary LocalCluster per run, a cluster of
separate ``dask scheduler``/``dask worker`` processes, and dask's local schedulers."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from runyard import Instance
from runyard.testing.conformance import ExecutorConformance

from .conftest import CliCluster


class TestDaskLocalClusterConformance(ExecutorConformance):
    """No address: each run starts a LocalCluster of worker processes and closes it."""

    executor = "dask"
    executor_config: ClassVar[dict[str, Any]] = {
        "cluster_kwargs": {"n_workers": 2, "threads_per_worker": 2, "processes": True, "host": "127.0.0.1"},
    }


class TestDaskCliClusterConformance(ExecutorConformance):
    """A scheduler and two workers started with the ``dask`` command, reached by address."""

    executor = "dask"

    @pytest.fixture
    def instance(self, runyard_make_instance: Any, cli_cluster: CliCluster) -> Instance:
        return runyard_make_instance({"executor": {"dask": {"address": cli_cluster.address, "connect_timeout": 30}}})


class TestDaskThreadsConformance(ExecutorConformance):
    executor = "dask"
    executor_config: ClassVar[dict[str, Any]] = {"local_scheduler": "threads"}


class TestDaskProcessesConformance(ExecutorConformance):
    executor = "dask"
    executor_config: ClassVar[dict[str, Any]] = {"local_scheduler": "processes"}
