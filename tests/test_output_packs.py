"""The file output store's pack layout (issue 18): each process appends a run's outputs to
its own pack file, and a reference says where the record is. Earlier outputs survive a torn
write, a damaged record is refused rather than unpickled, other processes and re-executions
read the references, and references of the older one-file-per-output layout still read."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from runyard import job, step
from runyard.errors import OutputPathError
from runyard.instance import Instance
from runyard.outputs import PACK_PREFIX, FileOutputStore


def packs(root: Path, run_id: str) -> list[Path]:
    return sorted((root / run_id).glob(PACK_PREFIX + "*"))


def test_a_run_s_outputs_go_to_one_pack_file_not_one_file_each(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    refs = {f"s{i}": store.put("run1", f"s{i}", {"i": i, "pad": "x" * i}) for i in range(200)}
    assert [p.name.startswith(PACK_PREFIX) for p in (tmp_path / "outputs" / "run1").iterdir()] == [True]
    assert all(ref.startswith(f"run1/{key}/") for key, ref in refs.items())
    assert {k: store.get(r) for k, r in refs.items()} == {f"s{i}": {"i": i, "pad": "x" * i} for i in range(200)}
    # A second store object (another process's view) reads the same references.
    other = FileOutputStore(tmp_path / "outputs")
    assert other.get(refs["s150"]) == {"i": 150, "pad": "x" * 150}
    assert other.has(refs["s3"]) and not other.has("run1/nothing")


def test_a_torn_write_leaves_earlier_outputs_readable_and_is_refused_itself(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    first = store.put("run1", "first", [1, 2, 3])
    torn = store.put("run1", "torn", "y" * 10_000)
    (pack,) = packs(tmp_path / "outputs", "run1")
    # A crash in the middle of the second record: only part of it reached the file.
    size = pack.stat().st_size
    os.truncate(pack, size - 5_000)
    fresh = FileOutputStore(tmp_path / "outputs")  # the next process
    assert fresh.get(first) == [1, 2, 3]
    with pytest.raises(KeyError, match="incomplete or damaged"):
        fresh.get(torn)
    assert not fresh.has(torn)
    # Writing goes on in a new pack; nothing earlier is rewritten.
    again = fresh.put("run1", "torn", "z")
    assert fresh.get(again) == "z" and fresh.get(first) == [1, 2, 3]
    assert len(packs(tmp_path / "outputs", "run1")) == 2


def test_a_damaged_record_is_refused_not_unpickled(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    ref = store.put("run1", "step", b"A" * 1000)
    keep = store.put("run1", "other", 7)
    (pack,) = packs(tmp_path / "outputs", "run1")
    raw = bytearray(pack.read_bytes())
    raw[raw.index(b"A" * 1000) + 500] ^= 0xFF  # a flipped byte in the value
    pack.write_bytes(bytes(raw))
    with pytest.raises(KeyError, match="incomplete or damaged"):
        FileOutputStore(tmp_path / "outputs").get(ref)
    assert FileOutputStore(tmp_path / "outputs").get(keep) == 7
    # A reference pointing into the middle of a record, or at another step's record, is refused too.
    run, key, loc = keep.split("/")
    token, offset, length = loc.split(".")
    with pytest.raises(KeyError):
        store.get(f"{run}/{key}/{token}.{int(offset) + 1}.{length}")
    with pytest.raises(KeyError):
        store.get(f"{run}/step/{token}.{offset}.{length}")


@pytest.mark.parametrize("loc", ["zz.1.2", "0123456789abcdef.x.2", "0123456789abcdef.1", "0123456789ABCDEF.1.2"])
def test_malformed_pack_references_are_refused(tmp_path: Path, loc: str) -> None:
    with pytest.raises(OutputPathError, match="neither RUN_ID/STEP_KEY nor"):
        FileOutputStore(tmp_path / "outputs").get(f"run1/step/{loc}")


def test_a_pack_symlinked_elsewhere_is_not_read(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    ref = store.put("run1", "step", 1)
    (pack,) = packs(tmp_path / "outputs", "run1")
    elsewhere = tmp_path / "elsewhere"
    pack.rename(elsewhere)
    pack.symlink_to(elsewhere)
    with pytest.raises(OutputPathError, match="symbolic link"):
        FileOutputStore(tmp_path / "outputs").get(ref)


def test_outputs_of_the_older_one_file_layout_still_read(tmp_path: Path) -> None:
    (tmp_path / "outputs" / "run1").mkdir(parents=True)
    (tmp_path / "outputs" / "run1" / "step").write_bytes(pickle.dumps({"old": True}))
    store = FileOutputStore(tmp_path / "outputs")
    assert store.get("run1/step") == {"old": True}
    with pytest.raises(KeyError):
        store.get("run1/missing")
    store.put("run1", "new", 1)
    with pytest.raises(KeyError):  # a pack file is not an output
        store.get(f"run1/{packs(tmp_path / 'outputs', 'run1')[0].name}")


def test_a_removed_run_folder_is_made_again_on_the_next_write(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    store.put("run1", "a", 1)
    for p in packs(tmp_path / "outputs", "run1"):
        p.unlink()
    (tmp_path / "outputs" / "run1").rmdir()  # what `run delete` does to the folder
    ref = store.put("run1", "b", 2)
    assert FileOutputStore(tmp_path / "outputs").get(ref) == 2


def test_a_forked_child_writes_its_own_pack_and_the_parent_reads_it(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    mine = store.put("run1", "parent", "p")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: inherits the store (and its pack) but must not append to the parent's
        try:
            os.write(write, store.put("run1", "child", "c").encode())
        finally:
            os._exit(0)
    os.close(write)
    child_ref = os.read(read, 1000).decode()
    os.close(read)
    assert os.waitpid(pid, 0)[1] == 0
    assert len(packs(tmp_path / "outputs", "run1")) == 2
    assert store.get(child_ref) == "c" and store.get(mine) == "p"
    assert store.get(store.put("run1", "later", "l")) == "l"


def test_another_process_reads_the_references(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    refs = [store.put("run1", f"k{i}", i * i) for i in range(5)]
    code = ("import sys\nfrom runyard.outputs import FileOutputStore\n"
            "s = FileOutputStore(sys.argv[1])\nprint(sum(s.get(r) for r in sys.argv[2:]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "outputs"), *refs],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sum(i * i for i in range(5)))


@step
def base() -> int:
    return 20


@step
def plus(x: int) -> int:
    return x + 1


@job
def packed() -> None:
    plus(base())


def test_re_execution_in_a_new_process_reads_the_parent_s_packed_outputs(runyard_instance: Instance) -> None:
    parent = packed.execute_in_process(instance=runyard_instance, raise_on_error=True)
    root = Path(runyard_instance.output_store(shared=True).base)
    (pack,) = packs(root, parent.run_id)
    with open(pack, "ab") as f:  # a later writer torn mid-record: the parent's records stay good
        f.write(b"RYO1\x00\x01")
    code = (
        "import sys\nfrom runyard.instance import Instance\nfrom tests.test_output_packs import packed\n"
        "r = packed.execute_in_process(instance=Instance(sys.argv[1]), step_selection=['plus'],"
        " parent_run_id=sys.argv[2])\nassert r.success, r.events\nprint(r.output_for('plus'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(runyard_instance.home), parent.run_id],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "21"


def test_a_long_lived_writer_keeps_only_a_few_pack_fds_open(tmp_path: Path) -> None:
    from runyard.outputs import OPEN_PACKS

    store = FileOutputStore(tmp_path / "outputs")
    before = len(os.listdir("/proc/self/fd"))
    refs = [store.put(f"run{i}", "step", i) for i in range(OPEN_PACKS + 20)]  # a worker serving many runs
    assert len(os.listdir("/proc/self/fd")) - before <= OPEN_PACKS
    assert [store.get(r) for r in refs] == list(range(OPEN_PACKS + 20))  # old packs: opened to read
    assert store.get(store.put("run0", "again", "x")) == "x"  # an evicted run's pack: a new one
