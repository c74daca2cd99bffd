"""Output stores keep every output under their root, and relative paths in runyard.yaml
mean relative to the file's folder, whatever directory the command runs from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from runyard.errors import OutputPathError
from runyard.instance import CONFIG_FILE, Instance
from runyard.outputs import FileOutputStore, FsspecOutputStore, MemoryOutputStore
from runyard.registry import PluginRegistry

ESCAPES = ["../../../../tmp/x", "..", ".", "", "a/b", "/abs", "a\\b", "a\0b", "x" * 256]


@pytest.mark.parametrize("bad", ESCAPES)
def test_file_store_refuses_run_ids_and_step_keys_that_leave_its_root(tmp_path: Path, bad: str) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    with pytest.raises(OutputPathError, match="is not a plain name"):
        store.put("run1", bad, 1)
    with pytest.raises(OutputPathError, match="is not a plain name"):
        store.put(bad, "step", 1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("ref", ["../secret", "run/../../secret", "/etc/passwd", "run//step", "run/step/", ""])
def test_file_store_refuses_references_outside_its_root(tmp_path: Path, ref: str) -> None:
    (tmp_path / "secret").write_bytes(b"not a pickle of ours")
    store = FileOutputStore(tmp_path / "outputs")
    with pytest.raises(OutputPathError):
        store.get(ref)


def test_file_store_refuses_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "run1").symlink_to(outside)
    store = FileOutputStore(tmp_path / "outputs")
    with pytest.raises(OutputPathError, match="outside the store"):
        store.put("run1", "step", 1)
    assert list(outside.iterdir()) == []


def test_valid_references_still_round_trip(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    ref = store.put("3f2c9a1b", "load.csv-2", {"rows": 3})
    assert ref.startswith("3f2c9a1b/load.csv-2/") and store.get(ref) == {"rows": 3}
    mem = MemoryOutputStore()
    with pytest.raises(OutputPathError):
        mem.put("run", "../x", 1)
    mem.close()


def test_fsspec_store_refuses_escapes(tmp_path: Path) -> None:
    pytest.importorskip("fsspec", reason="needs fsspec (the fsspec output store)")
    store = FsspecOutputStore(f"file://{tmp_path}/outputs")
    with pytest.raises(OutputPathError):
        store.put("run", "../../x", 1)
    with pytest.raises(OutputPathError):
        store.get("run/../../x")


def _instance_from(cwd: Path, home: Path) -> dict[str, str]:
    """Where a CLI process started in ``cwd`` puts outputs and the database."""
    out = subprocess.run(
        [sys.executable, "-m", "runyard", "instance", "info", "--json"],
        cwd=cwd, env={**os.environ, "RUNYARD_HOME": str(home)}, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout)


def test_relative_outputs_path_is_relative_to_runyard_yaml(tmp_path: Path, runyard_registry: PluginRegistry) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / CONFIG_FILE).write_text("outputs: shared-outputs\nstorage: {sqlite: {path: db/runs.db}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    old = Path.cwd()
    os.chdir(elsewhere)
    try:
        inst = Instance(home, registry=runyard_registry)
        assert inst.outputs_url == str(home.resolve() / "shared-outputs")
        store = inst.output_store(shared=True)
        assert isinstance(store, FileOutputStore) and store.base == home.resolve() / "shared-outputs"
        inst.storage.close()
    finally:
        os.chdir(old)
    assert (home / "db" / "runs.db").is_file(), "the sqlite path must be relative to the instance folder"
    assert not (elsewhere / "db").exists() and not (elsewhere / "shared-outputs").exists()
    shown = _instance_from(elsewhere, home)
    assert shown["outputs"] == str(home.resolve() / "shared-outputs")


def test_urls_and_absolute_outputs_are_unchanged(runyard_make_instance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert runyard_make_instance({"outputs": "s3://bucket/prefix"}).outputs_url == "s3://bucket/prefix"
    assert runyard_make_instance({"outputs": str(tmp_path / "abs")}).outputs_url == str(tmp_path / "abs")


def test_file_store_reads_no_output_through_a_symlink(tmp_path: Path) -> None:
    # The run's folder is checked once; a file of the older one-file-per-output layout (and a
    # pack) is opened with O_NOFOLLOW.
    secret = tmp_path / "secret"
    secret.write_bytes(b"not a pickle of ours")
    store = FileOutputStore(tmp_path / "outputs")
    ref = store.put("run1", "real", 1)
    assert store.get(ref) == 1
    (tmp_path / "outputs" / "run1" / "step").symlink_to(secret)
    with pytest.raises(OutputPathError, match="symbolic link"):
        store.get("run1/step")
    # Writing that key appends the output to the run's pack: the link is not written through.
    assert store.get(store.put("run1", "step", 2)) == 2 and secret.read_bytes() == b"not a pickle of ours"


def test_file_store_remakes_a_run_folder_removed_under_it(tmp_path: Path) -> None:
    import shutil

    store = FileOutputStore(tmp_path / "outputs")
    store.put("run1", "a", 1)
    shutil.rmtree(tmp_path / "outputs" / "run1")  # `runyard run delete` in another process
    with pytest.raises(KeyError):
        store.get("run1/a")
    assert store.get(store.put("run1", "b", 2)) == 2
    assert oct((tmp_path / "outputs" / "run1").stat().st_mode & 0o777) == oct(0o700)
