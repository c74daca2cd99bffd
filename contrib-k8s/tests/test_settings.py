"""Settings, the per-step override tag, the manifests and ``runyard k8s render``: no cluster
needed. What the API server does with the manifests is tested on the real cluster
(test_executor.py, test_failures.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from runyard import ConfigError
from runyard.plugin import structure_config
from runyard_k8s.manifest import APPENDED_LISTS, JobBuilder, merge
from runyard_k8s.settings import (
    LABEL_ATTEMPT_ID,
    LABEL_KIND,
    LABEL_RUN_ID,
    LABEL_STEP_KEY,
    K8sExecutorConfig,
    K8sLauncherConfig,
    label_value,
    parse_step_override,
)

JOBS = Path(__file__).resolve().parent / "k8s_jobs.py"


def settings(**kw: Any) -> K8sExecutorConfig:
    return structure_config({"image": "img:1", **kw}, K8sExecutorConfig, source="runyard.yaml", path="executor.k8s")


def step_job(cfg: K8sExecutorConfig, tags: dict[str, str] | None = None, timeout: float | None = None,
             key: str = "extract") -> dict[str, Any]:
    return JobBuilder(cfg, "executor.k8s", "/srv/home").step_job(
        run_id="0123456789abcdef0123456789abcdef", step_key=key, attempt=2, attempt_id="aaaabbbbccccdddd",
        payload="{}", tags=tags or {}, timeout=timeout)


def test_every_issue_key_is_a_setting_of_both_executor_and_launcher() -> None:
    keys = {"namespace", "image", "image_pull_policy", "image_pull_secrets", "service_account_name", "env_vars",
            "env_secrets", "env_config_maps", "volumes", "volume_mounts", "labels", "annotations", "resources",
            "node_selector", "tolerations", "affinity", "security_context", "scheduler_name",
            "ttl_seconds_after_finished", "kubeconfig_file", "context", "load_incluster_config",
            "pod_creation_timeout", "pending_timeout", "image_pull_timeout", "container", "pod_spec",
            "pod_metadata", "job_spec", "job_metadata", "terminate_grace"}
    import attrs

    for cls in (K8sExecutorConfig, K8sLauncherConfig):
        assert keys <= {f.name for f in attrs.fields(cls)}, keys - {f.name for f in attrs.fields(cls)}
    docs = (Path(__file__).resolve().parents[2] / "docs" / "backends" / "k8s.md").read_text()
    undocumented = [k for k in sorted(keys) if f"`{k}`" not in docs]
    assert not undocumented, f"settings missing from docs/backends/k8s.md: {undocumented}"


@pytest.mark.parametrize(("raw", "expected"), [
    ({"image_pull_policy": "sometimes"}, "image_pull_policy: expected one of Never, IfNotPresent, Always"),
    ({"resources": {"limits": {"memory": "lots"}}}, "resources.limits.memory: expected a Kubernetes quantity"),
    ({"resources": {"limit": {"memory": "1Gi"}}}, "resources.limit: unknown key (use requests or limits)"),
    ({"container": {"command": ["x"]}}, "container.command: set by the plugin"),
    ({"job_spec": {"backoffLimit": 3}}, "job_spec.backoffLimit: set by the plugin (always 0"),
    ({"pod_spec": {"restartPolicy": "OnFailure"}}, "pod_spec.restartPolicy: set by the plugin"),
    ({"namespace": "Not_A_Namespace"}, "namespace: 'Not_A_Namespace' is not a namespace name"),
    ({"env_vars": [{"A": {"oops": 1}}]}, "env_vars[0]: expected NAME"),
    ({"volumes": ["/a:/b"]}, "executor.k8s.volumes[0]: expected a mapping"),
    ({"imagee": "x"}, "unknown key 'imagee'"),
    ({"load_incluster_config": True, "context": "c"}, "load_incluster_config: true uses the pod's service account"),
])
def test_bad_settings_name_the_file_key_and_fix(raw: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        settings(**raw)
    assert "runyard.yaml" in str(e.value) and expected in str(e.value), str(e.value)


def test_step_pods_hold_the_log_finalizer_beside_the_users_own() -> None:
    # The executor takes it off once it has read the ended pod's log (tested on the cluster:
    # test_failures.py::test_ttl_zero_...); a pod_metadata patch cannot drop it.
    from runyard_k8s.settings import LOG_FINALIZER

    assert step_job(settings())["spec"]["template"]["metadata"]["finalizers"] == [LOG_FINALIZER]
    cfg = settings(pod_metadata={"finalizers": ["example.com/keep", LOG_FINALIZER]})
    assert step_job(cfg)["spec"]["template"]["metadata"]["finalizers"] == ["example.com/keep", LOG_FINALIZER]
    assert "finalizers" not in step_job(cfg)["metadata"]  # the Job itself: deleted as usual


def test_step_job_has_backoff_zero_labels_ttl_deadline_and_the_step_worker() -> None:
    cfg = settings(namespace="jobs", ttl_seconds_after_finished=30, terminate_grace=3,
                   labels={"team": "data"}, annotations={"a": "b"})
    job = step_job(cfg, timeout=10)
    spec = job["spec"]
    assert job["metadata"]["namespace"] == "jobs"
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == 30
    assert spec["activeDeadlineSeconds"] == 10 + 3 + 60  # a backstop past the engine's own deadline
    labels = job["metadata"]["labels"]
    assert labels[LABEL_KIND] == "step" and labels[LABEL_RUN_ID] == "0123456789abcdef0123456789abcdef"
    assert labels[LABEL_STEP_KEY] == "extract" and labels[LABEL_ATTEMPT_ID] == "aaaabbbbccccdddd"
    assert labels["team"] == "data"
    assert spec["template"]["metadata"]["labels"] == labels  # pods carry the same labels: sweeps find them
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] == 3
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["command"][:2] == ["/bin/sh", "-c"] and "api execute-step --stream" in container["command"][2]
    assert container["image"] == "img:1" and container["imagePullPolicy"] == "IfNotPresent"


def test_raw_patches_merge_by_the_documented_rule() -> None:
    cfg = settings(
        env_vars=["A=1"],
        volumes=[{"name": "v", "emptyDir": {}}],
        resources={"requests": {"cpu": "100m"}},
        container={"env": [{"name": "B", "value": "2"}], "resources": {"limits": {"cpu": "1"}},
                   "workingDir": "/w"},
        pod_spec={"volumes": [{"name": "w", "emptyDir": {}}], "hostNetwork": True,
                  "nodeSelector": {"disk": "ssd"}},
        job_metadata={"labels": {LABEL_KIND: "hijacked", "extra": "1"}},
        job_spec={"ttlSecondsAfterFinished": 5},
    )
    job = step_job(cfg, tags={"runyard/k8s/config": json.dumps({
        "image": "other:2", "resources": {"limits": {"memory": "1Gi"}},
        "container": {"env": [{"name": "C", "value": "3"}]}, "pod_spec": {"nodeSelector": {"zone": "a"}}})})
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    names = [e["name"] for e in c["env"]]
    assert names[:2] == ["A", "PYTHONUNBUFFERED"] and names[-2:] == ["B", "C"]  # lists appended
    assert c["resources"] == {"requests": {"cpu": "100m"}, "limits": {"cpu": "1", "memory": "1Gi"}}  # deep merge
    assert c["workingDir"] == "/w" and c["image"] == "other:2"
    assert [v["name"] for v in pod["volumes"]] == ["v", "w"]
    assert pod["hostNetwork"] is True and pod["nodeSelector"] == {"disk": "ssd", "zone": "a"}
    assert job["metadata"]["labels"][LABEL_KIND] == "step", "a patch must not change the labels cleanup selects by"
    assert job["metadata"]["labels"]["extra"] == "1" and job["spec"]["ttlSecondsAfterFinished"] == 5
    assert "env" in APPENDED_LISTS and merge({"a": [1]}, {"a": [2]}) == {"a": [2]}  # other lists replace


def test_resources_tag_becomes_guaranteed_limits() -> None:
    job = step_job(settings(), tags={"runyard/resources": "memory=64m,cpus=0.5"})
    res = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res == {"limits": {"memory": "64Mi", "cpu": "0.5"}, "requests": {"memory": "64Mi", "cpu": "0.5"}}


@pytest.mark.parametrize(("tag", "expected"), [
    ("not json at all {", "is neither JSON nor a dict's text"),
    ('{"imagee": "x"}', "unknown key 'imagee'"),
    ('{"container": {"args": ["x"]}}', "container.args: set by the plugin"),
    ('{"resources": {"limits": {"cpu": "many"}}}', "expected a Kubernetes quantity"),
])
def test_bad_step_override_tag_names_the_step_and_tag(tag: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_step_override(tag, "load")
    assert "step 'load': tag 'runyard/k8s/config'" in str(e.value) and expected in str(e.value), str(e.value)


def test_label_values_are_valid_and_distinct() -> None:
    import re

    valid = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
    keys = ["double_2", "a" * 100, "map[0]", "map[1]", "-x-", "ünïcode"]
    values = [label_value(k) for k in keys]
    assert all(valid.match(v) for v in values), values
    assert len(set(values)) == len(values) and values[0] == "double_2"


def test_client_major_outside_the_tested_range_is_refused() -> None:
    import kubernetes
    from runyard.plugin import PluginError
    from runyard_k8s._k8s import TESTED_MAJORS, check_client_version

    # The installed client is a tested one (pyproject pins the same range)...
    assert int(kubernetes.__version__.split(".")[0]) in TESTED_MAJORS, (
        f"kubernetes {kubernetes.__version__} is installed but runyard-k8s was tested with {TESTED_MAJORS}: "
        "test it, then add its major to TESTED_MAJORS and the pyproject pin"
    )
    check_client_version()
    # ... and any other major is refused with the fix.
    for untested in (f"{TESTED_MAJORS[-1] + 1}.0.0", f"{TESTED_MAJORS[0] - 1}.2.0"):
        with pytest.raises(PluginError, match=r"pip install 'kubernetes>="):
            check_client_version(untested)


def test_plugin_module_does_not_import_the_client() -> None:
    code = (
        "import sys, runyard_k8s.plugin, runyard_k8s.settings, runyard_k8s.manifest, runyard_k8s.cli\n"
        "from runyard.registry import PluginRegistry\n"
        "r = PluginRegistry(); r.executor('k8s'); r.run_launcher('k8s')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'urllib3', 'yaml_')))"
    )
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "[]"


def _render(home: Path, config: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    home.mkdir(exist_ok=True)
    (home / "runyard.yaml").write_text(yaml.safe_dump(config))
    import os

    env = {**os.environ, "RUNYARD_HOME": str(home), "KUBECONFIG": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "runyard", "k8s", "render", "-f", str(JOBS), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_render_prints_the_jobs_without_a_cluster(tmp_path: Path) -> None:
    cfg = {"executor": {"k8s": {"image": "img:1", "namespace": "jobs"}},
           "run_launcher": {"k8s": {"image": "img:1", "namespace": "jobs"}}}
    done = _render(tmp_path / "home", cfg, "-j", "unschedulable_job")
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert [d["metadata"]["labels"][LABEL_KIND] for d in docs] == ["step", "run"]
    step_pod = docs[0]["spec"]["template"]["spec"]
    assert step_pod["nodeSelector"] == {"runyard.test/no-such-node": "1"}  # the step's tag applied
    assert "api execute-run" in docs[1]["spec"]["template"]["spec"]["containers"][0]["command"][2]
    one = _render(tmp_path / "home", cfg, "-j", "wide_job", "--step", "noop_3")
    assert one.returncode == 0, one.stderr
    (only,) = list(yaml.safe_load_all(one.stdout))
    assert only["metadata"]["annotations"]["runyard.io/step-key"] == "noop_3"


@pytest.mark.parametrize(("config", "args", "expected"), [
    ({}, ("-j", "noop_job"), "neither executor: {k8s: ...} nor run_launcher: {k8s: ...} is configured"),
    ({"executor": {"k8s": {"image": "i"}}}, ("-j", "noop_job", "--step", "nope"), "has no step 'nope'"),
    ({"executor": {"k8s": {"image": "i", "pod_spec": {"containers": []}}}}, ("-j", "noop_job"),
     "executor.k8s: pod_spec.containers: set by the plugin; use container"),
])
def test_render_errors_exit_2_with_the_fix(tmp_path: Path, config: dict[str, Any], args: tuple[str, ...],
                                           expected: str) -> None:
    done = _render(tmp_path / "home", config, *args)
    assert done.returncode == 2 and expected in done.stderr, (done.returncode, done.stderr)


def test_render_without_step_tags_uses_instance_settings(tmp_path: Path) -> None:
    done = _render(tmp_path / "home", {"executor": {"k8s": {"image": "img:7", "env_vars": [{"X": "1"}]}}},
                   "-j", "noop_job")
    (doc,) = list(yaml.safe_load_all(done.stdout))
    c = doc["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "img:7" and {"name": "X", "value": "1"} in c["env"]
