"""The celery_k8s launcher/executor pair check (the part of celery_k8s that needs no cluster):
a run whose launcher and executor disagree on broker, backend, namespace or image is
rejected before launch, naming both keys. (Without runyard-k8s, the install hint:
test_celery_k8s.py::test_missing_runyard_k8s_is_an_install_hint.)"""

from __future__ import annotations

import pytest
from runyard.plugin import EnvVar
from runyard_celery.k8s_settings import pair_problems

L, E = "runyard.yaml: run_launcher.celery_k8s", "runyard.yaml: executor.celery_k8s"
BASE = {"broker": "redis://r:6379/0", "k8s": {"image": "jobs:1", "namespace": "etl"}}


def test_an_agreeing_pair_has_no_problem() -> None:
    assert pair_problems(BASE, L, "celery_k8s", {**BASE, "queue_timeout": 5}, E) == []


@pytest.mark.parametrize(
    ("executor", "launcher_key", "executor_key"),
    [
        ({**BASE, "broker": "amqp://other//"}, "broker", "broker"),
        ({**BASE, "backend": "redis://r:6379/1"}, "backend", "backend"),
        ({**BASE, "k8s": {"image": "jobs:1"}}, "k8s.namespace", "k8s.namespace"),
        ({**BASE, "k8s": {"image": "jobs:2", "namespace": "etl"}}, "k8s.image", "k8s.image"),
    ],
    ids=["broker", "backend", "namespace-defaulted", "image"],
)
def test_a_disagreement_names_both_keys_and_values(executor: dict, launcher_key: str, executor_key: str) -> None:
    (problem,) = pair_problems(BASE, L, "celery_k8s", executor, E)
    assert f"{L}.{launcher_key} (" in problem and f"{E}.{executor_key} (" in problem
    assert "disagree" in problem


def test_env_references_compare_as_written() -> None:
    launcher = {**BASE, "broker": EnvVar("BROKER_URL")}
    assert pair_problems(launcher, L, "celery_k8s", {**BASE, "broker": {"env": "BROKER_URL"}}, E) == []
    (problem,) = pair_problems(launcher, L, "celery_k8s", {**BASE, "broker": {"env": "OTHER"}}, E)
    assert "BROKER_URL" in problem and "OTHER" in problem


def test_another_executor_is_refused() -> None:
    (problem,) = pair_problems(BASE, L, "celery", BASE, "runyard.yaml: executor.celery")
    assert "celery_k8s executor" in problem and "'celery'" in problem
