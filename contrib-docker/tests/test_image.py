"""`runyard docker build-image` (the test image itself is built by it, in the session
fixture): job code baked into an image runs with ``mount_code: false``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from runyard import execute_job

CODE = '''
from runyard import job, step

@step
def where() -> str:
    return __file__

@job
def baked():
    where()
'''


ROOT = Path(__file__).resolve().parents[2]


def _with_args() -> list[str]:
    """The --with arguments scripts/build-test-image.sh passes (scripts/test-image.with)."""
    args: list[str] = []
    for line in (ROOT / "scripts" / "test-image.with").read_text().splitlines():
        if line and not line.startswith("#"):
            args += ["--with", str(ROOT / line[2:]) if line.startswith("./") else line]
    return args


def _build_image(base: str, tag: str, code: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "runyard", "docker", "build-image", "--base", base, "--tag", tag,
         "--code", str(code), "--label", "runyard.test=1", *_with_args()],
        capture_output=True, text=True, timeout=600, env=os.environ,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_code_baked_into_the_image_runs_without_the_code_mount(
    docker_image: str, docker_client: Any, runyard_make_instance: Any, docker_settings: dict[str, Any],
    tmp_path: Path,
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "baked_jobs.py").write_text(CODE)
    tag = f"runyard-test/baked:{tmp_path.name[-8:].lower()}"
    try:
        done = _build_image(docker_image, tag, code)
        if "building wheels of" in done.stderr:
            # No wheels of these sources were kept (the test image was up to date, so
            # scripts/build-test-image.sh built none): this build kept them; new job code
            # must now reuse them.
            (code / "more_jobs.py").write_text("")
            done = _build_image(docker_image, tag, code)
        assert "using the wheels built before" in done.stderr, done.stderr
        image = docker_client.images.get(tag)
        assert image.labels["runyard.test"] == "1" and image.labels["runyard.source-hash"]
        # The job file is gone from the host: only the copy in the image can be loaded.
        from runyard import CodePointer
        from runyard.plugin import preload_job

        job = preload_job(CodePointer(file=str(code / "baked_jobs.py")), "baked")
        (code / "baked_jobs.py").unlink()
        # No volumes: the tests' usual mount of pytest's basetemp would cover the baked copy.
        instance = runyard_make_instance({"executor": {"docker": {**docker_settings, "image": tag, "volumes": [],
                                                                  "mount_code": False}}})
        result = execute_job(job, instance=instance)
        assert result.success, result.events
        assert result.output_for("where") == str(code / "baked_jobs.py")
    finally:
        try:
            docker_client.images.remove(tag, force=True)
        except Exception:
            pass
