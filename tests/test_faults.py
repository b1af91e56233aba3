"""Faults: kill -9 at random moments, Ctrl-C and SIGTERM, full disks, read-only inputs, --verify, --strict.

Expected values come from the files themselves (hashlib over the bytes, a previous good output, values
written by the test), never from the code under test.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckpt_ema.jobs.integrity import DEFAULT_HASH
from ckpt_ema.output import writer
from ckpt_ema.output.writer import TEMP_MARKER, SafetensorsWriter, WriteOptions, remove_stale_temps

from .reference import invoke as run

STEPS = [100, 200, 300, 400, 500]
TARGET = ["--half-life", "100"]  # no plan warning for this series (first share 6%, half-life = spacing)


def make_series(folder: Path, tensors: int = 8, size: int = 64, scale=None, steps=STEPS) -> list[Path]:
    """Checkpoints whose tensors hold random values (seeded), times ``scale[step]`` if given."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for step in steps:
        factor = (scale or {}).get(step, 1.0)
        state = {f"block.{i}.weight": torch.randn(size, generator=generator) * factor for i in range(tensors)}
        state["counter"] = torch.tensor([step], dtype=torch.int64)
        path = folder / f"step-{step:06d}.safetensors"
        save_file(state, str(path))
        paths.append(path)
    return paths


def temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if TEMP_MARKER in p.name)


def one_error_line(result: CliRunner.Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# kill -9 at random moments: the output is absent or a complete, valid file; stale temporaries are cleaned

FORK_SERVER = r"""
import json, os, signal, sys
from ckpt_ema.cli import main
MARK = ".ckpt-ema-tmp-"

def stop_here(ready):
    os.write(ready, b"stopped\n")  # the test kills or signals this process now
    r, w = os.pipe()
    os.read(r, 1)  # blocks for good: nobody writes to w

def is_temp(fd):
    try:
        return MARK in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False

def install(moment, count, ready, output):
    if moment == "temp":  # the temporary file exists, the writer has not seen its descriptor yet
        real_open = os.open
        def hooked_open(path, flags, *args, **kwargs):
            fd = real_open(path, flags, *args, **kwargs)
            if MARK in os.fspath(path) and flags & os.O_CREAT:
                stop_here(ready)
            return fd
        os.open = hooked_open
    elif moment == "write":  # the count-th write into a temporary file (the first is the header)
        real_fdopen = os.fdopen
        calls = [0]
        class Held:
            def __init__(self, file):
                self.file = file
            def write(self, data):
                calls[0] += 1
                if calls[0] == count:
                    stop_here(ready)
                return self.file.write(data)
            def __getattr__(self, name):
                return getattr(self.file, name)
        def hooked_fdopen(fd, *args, **kwargs):
            file = real_fdopen(fd, *args, **kwargs)
            return Held(file) if is_temp(fd) else file
        os.fdopen = hooked_fdopen
    elif moment == "fsync":  # the temporary file is complete, about to be flushed and renamed
        real_fsync = os.fsync
        def hooked_fsync(fd):
            if is_temp(fd):
                stop_here(ready)
            return real_fsync(fd)
        os.fsync = hooked_fsync
    elif moment == "renamed":  # the output is in place; the run has not finished
        real_replace = os.replace
        def hooked_replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            if os.fspath(dst) == output:
                stop_here(ready)
        os.replace = hooked_replace

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        # Ctrl-C reaches the run as in a terminal, even when the test runner was started with SIGINT ignored
        # (a background job of a non-interactive shell): otherwise the SIGINT test would wait for good.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if request["stderr"] else null, 2)
        install(request["moment"], request["count"], request["ready"], request["output"])
        try:
            main(request["args"], prog_name="ckpt-ema")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


class ForkServer:
    """A Python process that has imported ckpt-ema once and forks a fresh ``ckpt-ema`` process per run.

    Each run is a real separate process; forking saves the second of importing torch that every fresh
    interpreter would spend. A run can be stopped at a chosen moment (``moment``: ``temp``, ``write``
    with the ``count``-th write, ``fsync``, ``renamed``): it says so on a pipe and waits there, so that
    the test kills or signals it exactly then, whatever the load of the machine (no sleeps, no races).
    """

    def __init__(self) -> None:
        self.ready_r, self.ready_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(self.ready_w,),
        )

    def start(self, args: list, moment: str | None = None, count: int = 0, stderr: Path | None = None) -> int:
        output = str(args[args.index("-o") + 1]) if "-o" in args else ""
        request = {"args": [str(a) for a in args], "moment": moment, "count": count, "ready": self.ready_w}
        request.update(output=output, stderr=str(stderr) if stderr else "")
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def stopped(self, timeout: float = 300.0) -> bool:
        """Wait until the run reports its moment (True) or finishes without reaching it (False)."""
        readable, _, _ = select.select([self.ready_r, self.process.stdout], [], [], timeout)
        if self.ready_r in readable:
            os.read(self.ready_r, 8)
            return True
        assert readable, "the run neither reached its moment nor finished"
        return False

    def wait(self, timeout: float = 600.0) -> int:
        """The run's wait status; a run still going after ``timeout`` seconds (a hang guard) fails the test."""
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert readable, "the run did not finish"
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        os.close(self.ready_r)
        os.close(self.ready_w)


@pytest.mark.slow
def test_kill_9_at_chosen_moments_never_leaves_a_partial_output(tmp_path):
    inputs = make_series(tmp_path / "run", tensors=300, size=1024)  # 5 x 1.2 MB, 300 tensors each
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    good = out_folder / "good.safetensors"
    server = ForkServer()
    try:
        server.start(["merge", *inputs, *TARGET, "-o", good])
        assert os.WEXITSTATUS(server.wait()) == 0
        reference = load_file(good)
        random_ = random.Random(7)
        moments = ["renamed", "temp", "write", "fsync", "write"]  # the last run is killed while writing
        killed_while_writing = 0
        for iteration in range(15):
            # Even runs replace an existing good output (--force), odd runs write a new name.
            target = good if iteration % 2 == 0 else out_folder / f"new-{iteration}.safetensors"
            moment = moments[iteration % len(moments)]
            count = random_.randint(2, 300)  # the header is write 1; each tensor is at least one more
            args = ["merge", *inputs, *TARGET, "-o", target, "--force", "--hash-algorithm", "sha256"]
            pid = server.start(args, moment, count)
            assert server.stopped(), f"run {iteration} finished before {moment} {count}"
            temp = target.with_name(f".{target.name}{TEMP_MARKER}{pid}")
            writing = temp.exists()
            assert writing == (moment != "renamed")
            os.kill(pid, signal.SIGKILL)
            assert os.WIFSIGNALED(server.wait())
            assert temp.exists() == writing  # kill -9 leaves its temporary file: no handler can run
            killed_while_writing += writing
            for path in out_folder.glob("*.safetensors"):  # absent, or complete and equal to a good run
                result = load_file(path)
                assert result.keys() == reference.keys()
                assert all(torch.equal(result[k], reference[k]) for k in reference), path
                with safe_open(str(path), "pt") as f:
                    assert f.metadata()["ckpt_ema.input.4.sha256"] == hashlib.sha256(inputs[4].read_bytes()).hexdigest()
        assert killed_while_writing == 12
        assert temps(out_folder), "kill -9 leaves its temporary file (no handler can run)"
        server.start(["merge", *inputs, *TARGET, "-o", out_folder / "last.safetensors"])
        assert os.WEXITSTATUS(server.wait()) == 0
        assert temps(out_folder) == []  # the next run in the folder removed every stale one
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM while writing: temporary file removed, one line, exit 130 / 143


@pytest.mark.parametrize(
    "signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_sigint_and_sigterm_remove_the_temporary_file(tmp_path, signum, code, word):
    inputs = make_series(tmp_path / "run", tensors=50)
    out = tmp_path / "out" / "ema.safetensors"
    stderr = tmp_path / "stderr.txt"
    server = ForkServer()
    try:
        pid = server.start(["merge", *inputs, *TARGET, "-o", out], "write", 20, stderr)
        assert server.stopped()  # in the middle of writing its 20th piece
        assert temps(out.parent) != []
        os.kill(pid, signum)
        assert os.WEXITSTATUS(server.wait()) == code
    finally:
        server.close()
    assert stderr.read_text().strip().splitlines() == [f"ckpt-ema: {word}; no output written, temporary files removed"]
    assert temps(out.parent) == [] and not out.exists()


# ---------------------------------------------------------------------------------------------------------
# Full disk


class _FailingFile:
    """Wraps the writer's file: writes fail with ``code`` once ``budget`` bytes have been written."""

    def __init__(self, file, budget: int, code: int) -> None:
        self._file, self._budget, self._code = file, budget, code

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self._budget:
            raise OSError(self._code, os.strerror(self._code))
        self._budget -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_failing_write_gives_one_line_and_removes_the_temporary_file(tmp_path, monkeypatch, code):
    inputs = make_series(tmp_path / "run")
    out = tmp_path / "out" / "ema.safetensors"
    real_fdopen = os.fdopen
    monkeypatch.setattr(writer.os, "fdopen", lambda fd, *a, **k: _FailingFile(real_fdopen(fd, *a, **k), 2000, code))
    # the free space reported is the file system's at that moment: a fixed one, since other programs (other
    # test runs on a busy machine) change the real one between the error and any later measurement
    monkeypatch.setattr(writer, "free_bytes", lambda folder: 123_456_789_012)
    line = one_error_line(run("merge", *inputs, *TARGET, "-o", out))
    monkeypatch.undo()
    expected_size = _good_output_size(inputs)
    if code == errno.EFBIG:
        assert (
            line == f"Error: {out}: file too large for this file system ({expected_size} bytes); temporary file removed"
        )
    else:
        assert line == (
            f"Error: {out}: disk full ({os.strerror(code)}): the output needs {expected_size} bytes, "
            "123456789012 are available; temporary file removed"
        )
    assert temps(out.parent) == [] and not out.exists()


def _good_output_size(inputs: list[Path]) -> int:
    """The size of a successful output of this series, measured by writing one."""
    probe = inputs[0].parent.parent / "probe.safetensors"
    assert run("merge", *inputs, *TARGET, "-o", probe, "--force").exit_code == 0
    return probe.stat().st_size


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    inputs = make_series(tmp_path / "run")
    out = tmp_path / "out" / "sub" / "ema.safetensors"
    monkeypatch.setattr(writer, "free_bytes", lambda folder: 1000)
    line = one_error_line(run("merge", *inputs, *TARGET, "-o", out))
    assert "not enough free space: the output needs " in line and "bytes, 1000 are available" in line
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")
@pytest.mark.parametrize("early", [True, False], ids=["checked-before", "full-while-writing"])
def test_full_tmpfs(tmp_path, early):
    """A real 256 kB tmpfs; ``full-while-writing`` hides the free space from the early check."""
    inputs = make_series(tmp_path / "run", tensors=100, size=1024)  # outputs of 400 kB
    disk = tmp_path / "disk"
    disk.mkdir()
    patch = "" if early else "import ckpt_ema.jobs.merge as a; a.check_free_space = lambda outputs: None; "
    command = f"{patch}from ckpt_ema.cli import main; main(prog_name='ckpt-ema')"
    args = " ".join(["merge", *map(str, inputs), *TARGET, "-o", str(disk / "ema.safetensors")])
    script = f'mount -t tmpfs -o size=256k tmpfs {disk} && {sys.executable} -c "{command}" {args}; echo "rc=$?"; ls -A {disk}'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "rc=1", done.stdout  # exit 1, and the folder is empty afterwards
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    if early:
        assert "not enough free space: the output needs " in lines[0] and " bytes, 262144 are available" in lines[0]
    else:
        assert "disk full (No space left on device): the output needs " in lines[0]
        available = int(lines[0].split(" bytes, ")[1].split()[0])
        assert 0 < available <= 262144 and lines[0].endswith("are available; temporary file removed")


# ---------------------------------------------------------------------------------------------------------
# Inputs are never opened for writing; outputs never replace an input or an existing file silently

_WRITE_OPENS: list[tuple[str, object, object]] | None = None


def _audit(event: str, args: tuple) -> None:
    if _WRITE_OPENS is not None and event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC)
        )
        if writes:
            _WRITE_OPENS.append((str(path), mode, flags))


sys.addaudithook(_audit)


def test_inputs_are_read_only_to_the_tool(tmp_path):
    global _WRITE_OPENS
    inputs = make_series(tmp_path / "run")
    for path in inputs:
        path.chmod(0o444)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in inputs}
    _WRITE_OPENS = []
    try:
        result = run("merge", *inputs, *TARGET, "--decay", "0.99", "-o", tmp_path / "out", "--verify")
        opened_for_writing = list(_WRITE_OPENS)
    finally:
        _WRITE_OPENS = None
    assert result.exit_code == 0, result.output
    assert opened_for_writing, "the audit hook sees the outputs being written"
    touched = {os.path.realpath(p) for p, _, _ in opened_for_writing if isinstance(p, str)}
    assert touched.isdisjoint({os.path.realpath(p) for p in inputs})
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in inputs} == before


def test_output_through_a_symlink_to_an_input_is_refused(tmp_path):
    inputs = make_series(tmp_path / "run")
    link = tmp_path / "link.safetensors"
    link.symlink_to(inputs[0])
    before = inputs[0].read_bytes()
    line = one_error_line(run("merge", *inputs, *TARGET, "-o", link, "--force"))
    assert line == f"Error: {link}: is an input ({inputs[0]}); choose another output"
    assert inputs[0].read_bytes() == before


def test_existing_output_is_kept_without_force_and_replaced_with_it(tmp_path):
    inputs = make_series(tmp_path / "run")
    out = tmp_path / "ema.safetensors"
    out.write_bytes(b"precious")
    line = one_error_line(run("merge", *inputs, *TARGET, "-o", out))
    assert line == f"Error: {out}: already exists; pass --force to replace it"
    assert out.read_bytes() == b"precious"
    assert run("merge", *inputs, *TARGET, "-o", out, "--force").exit_code == 0
    assert load_file(out).keys() == load_file(inputs[0]).keys()


def make_folder_series(root: Path) -> Path:
    """Hugging Face style ``checkpoint-N/`` folders, two shards each, values = step."""
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for step in STEPS:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"a.weight": torch.full((4,), float(step))}, str(folder / shards[0]))
        save_file({"b.weight": torch.full((2,), float(step))}, str(folder / shards[1]))
        index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "config.json").write_text("{}")
    return root


@pytest.mark.parametrize("output, fmt", [("ema.safetensors", "safetensors"), ("ema", "folder")])
def test_output_inside_a_checkpoint_folder_is_refused(tmp_path, output, fmt):
    run_folder = make_folder_series(tmp_path / "run")
    inside = run_folder / "checkpoint-300" / output
    before = sorted(p.name for p in inside.parent.iterdir())
    line = one_error_line(run("merge", run_folder, *TARGET, "--format", fmt, "-o", inside))
    assert line == f"Error: {inside}: is inside the checkpoint folder {inside.parent.resolve()}; choose another output"
    assert sorted(p.name for p in inside.parent.iterdir()) == before


def test_stale_temporaries_removed_but_not_live_ones_nor_links(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a.safetensors{TEMP_MARKER}{dead.pid}"
    stale.write_bytes(b"partial")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    link = tmp_path / f".b.safetensors{TEMP_MARKER}{dead.pid}"
    link.symlink_to(target)
    live = SafetensorsWriter(tmp_path / "c.safetensors", [], {})  # holds its lock, like a running merge
    old = tmp_path / f".d.safetensors{TEMP_MARKER}{os.getpid()}"  # our own pid: only its age makes it stale
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    try:
        removed = remove_stale_temps(tmp_path)
        assert sorted(removed) == sorted([stale, old])
        assert live.temp_path.exists() and link.is_symlink() and target.read_bytes() == b"keep"
        os.utime(live.temp_path, (time.time() - 3600, time.time() - 3600))
        assert remove_stale_temps(tmp_path) == []  # locked: kept even when old
    finally:
        live.abort()


# ---------------------------------------------------------------------------------------------------------
# Integrity: SHA-256 provenance, reserved header slots, --verify


def _file_hash(algorithm: str, data: bytes) -> str:
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    blake3 = pytest.importorskip("blake3")
    return blake3.blake3(data).hexdigest()


@pytest.mark.parametrize("algorithm", [None, "sha256", "blake3"])
def test_inputs_hashes_recorded_in_the_provenance(tmp_path, algorithm):
    inputs = make_series(tmp_path / "run", tensors=30, size=4096)
    out = tmp_path / "ema.safetensors"
    chosen = ["--hash-algorithm", algorithm] if algorithm else []
    assert run("merge", *inputs, *TARGET, "-o", out, *chosen).exit_code == 0
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    algorithm = algorithm or DEFAULT_HASH  # blake3 when the package is installed (a dependency)
    other = {"sha256": "blake3", "blake3": "sha256"}[algorithm]
    for index, path in enumerate(inputs):
        assert metadata[f"ckpt_ema.input.{index}.path"] == str(path)
        assert metadata[f"ckpt_ema.input.{index}.{algorithm}"] == _file_hash(algorithm, path.read_bytes())
        assert f"ckpt_ema.input.{index}.{other}" not in metadata


def _data_order(path: Path) -> list[str]:
    """The tensor names of a safetensors file in the order of their bytes."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda name: header[name]["data_offsets"][0])


def _count_the_hashers_own_reads(monkeypatch) -> list[int]:
    """Bytes the input hasher reads by itself (``pread``), rather than from the pass's reads."""
    from ckpt_ema.jobs.integrity import InputHasher

    counted: list[int] = []
    hash_range = InputHasher._hash_range

    def counting(self, checkpoint, state, stop):
        counted.append(max(0, stop - state.cursor))
        return hash_range(self, checkpoint, state, stop)

    monkeypatch.setattr(InputHasher, "_hash_range", counting)
    return counted


def _merge_recording_sha256(paths: list[Path], out: Path) -> None:
    assert run("merge", *paths, *TARGET, "-o", out, "--hash-algorithm", "sha256").exit_code == 0
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    for index, path in enumerate(paths):
        assert metadata[f"ckpt_ema.input.{index}.sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_mixed_precision_checkpoint_is_read_once_with_its_hash(tmp_path, monkeypatch):
    """safetensors stores F32 tensors before BF16 ones (by dtype, then by name), so the file's order is not
    the names' order. The pass follows the file's order: the hash rides on its reads and reads by itself
    only the headers, instead of most of the file a second time (which is what following the names did)."""
    paths = []
    for step in STEPS:
        g = torch.Generator().manual_seed(step)
        tensors = {f"layer{i}.weight": torch.randn(256, 256, generator=g).to(torch.bfloat16) for i in range(4)}
        tensors |= {f"layer{i}.norm": torch.randn(256, generator=g) for i in range(4)}
        paths.append(tmp_path / f"step-{step}.safetensors")
        save_file(tensors, str(paths[-1]))
    assert _data_order(paths[-1]) != sorted(_data_order(paths[-1]))  # the fixture is what it claims
    read_by_the_hasher = _count_the_hashers_own_reads(monkeypatch)
    out = tmp_path / "ema.safetensors"
    _merge_recording_sha256(paths, out)
    assert sum(read_by_the_hasher) == sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in paths)
    assert _data_order(out) == _data_order(paths[-1])  # the output keeps the newest input's layout


def test_a_torch_file_in_module_order_is_read_once_with_its_hash(tmp_path, monkeypatch):
    """``torch.save`` stores a state dict's tensors in insertion order (``layer10`` before ``layer2``): the
    hash reads by itself only the zip's and the pickle's bytes, not the tensors' (before the plan followed the
    bytes, it read 666130 of this series' 983040 tensor bytes itself)."""
    paths = []
    for step in STEPS:
        g = torch.Generator().manual_seed(step)
        state = {f"layer{i}.weight": torch.randn(128, 128, generator=g) for i in (10, 2, 1)}
        paths.append(tmp_path / f"step-{step}.pt")
        torch.save(state, paths[-1])
    read_by_the_hasher = _count_the_hashers_own_reads(monkeypatch)
    _merge_recording_sha256(paths, tmp_path / "ema.safetensors")
    tensor_bytes = 3 * 128 * 128 * 4
    assert 0 < sum(read_by_the_hasher) <= sum(p.stat().st_size - tensor_bytes for p in paths)


def test_a_sharded_folder_checkpoint_records_the_hash_of_its_sha256sum_manifest(tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    make_folder_series(tmp_path / "run")
    out = tmp_path / "out"
    assert run("merge", tmp_path / "run", *TARGET, "-o", out, "--verify", "--hash-algorithm", "sha256").exit_code == 0
    with safe_open(str(out / shards[0]), "pt") as f:
        metadata = f.metadata()
    first = tmp_path / "run" / "checkpoint-100"
    manifest = "".join(f"{hashlib.sha256((first / s).read_bytes()).hexdigest()}  {s}\n" for s in shards)
    # the same as: cd checkpoint-100 && sha256sum model-*.safetensors | sha256sum
    assert metadata["ckpt_ema.input.0.sha256"] == hashlib.sha256(manifest.encode()).hexdigest()


def test_late_metadata_is_written_in_place_in_the_reserved_slot(tmp_path):
    from ckpt_ema.plan.model import TensorPlan

    tensors = [TensorPlan("w", (3,), True, "F32")]
    values = {"late.a": "0123456789abcdef", "late.b": "x" * 4}
    options = WriteOptions(late_metadata={"late.a": 16, "late.b": 4}, late_values=lambda: values)
    sink = SafetensorsWriter(tmp_path / "t.safetensors", tensors, {"early": '"quoted" "late.a":"'}, options)
    sink.write("w", torch.tensor([1.0, 2.0, 3.0]))
    sink.commit()
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"early": '"quoted" "late.a":"', **values}
        assert f.get_tensor("w").tolist() == [1.0, 2.0, 3.0]
    values["late.b"] = "toolong"
    sink = SafetensorsWriter(tmp_path / "u.safetensors", tensors, {}, options)
    sink.write("w", torch.zeros(3))
    with pytest.raises(RuntimeError, match="late.b"):
        sink.commit()
    assert temps(tmp_path) == [] and not (tmp_path / "u.safetensors").exists()


def test_verify_passes_and_changes_nothing(tmp_path):
    inputs = make_series(tmp_path / "run")
    plain, verified = tmp_path / "plain.safetensors", tmp_path / "verified.safetensors"
    assert run("merge", *inputs, *TARGET, "-o", plain).exit_code == 0
    assert run("merge", *inputs, *TARGET, "-o", verified, "--verify").exit_code == 0
    assert plain.read_bytes() == verified.read_bytes()


def test_verify_catches_data_changed_on_disk_and_keeps_the_old_output(tmp_path, monkeypatch):
    inputs = make_series(tmp_path / "run")
    out = tmp_path / "ema.safetensors"
    out.write_bytes(b"old good output")

    def corrupt(fd, offset, length, advice):  # stands in for a disk that returns other bytes
        size = os.fstat(fd).st_size
        os.pwrite(fd, b"\x7f", size - 3)

    monkeypatch.setattr(writer.os, "posix_fadvise", corrupt)
    line = one_error_line(run("merge", *inputs, *TARGET, "-o", out, "--force", "--verify"))
    assert line == f"Error: {out}: --verify: the data read back differs from the data written"
    assert out.read_bytes() == b"old good output" and temps(tmp_path) == []


def test_verify_refuses_an_output_that_overflows_fp16(tmp_path):
    inputs = make_series(tmp_path / "run", scale={s: 1e6 for s in STEPS})
    out = tmp_path / "ema.safetensors"
    args = ["--dtype", "fp16", "--allow-overflow", "-o", out, "--verify"]  # written anyway: --verify refuses it
    result = run("merge", *inputs, *TARGET, *args)
    assert result.exit_code == 1
    warning, line = result.stderr.strip().splitlines()
    assert warning.startswith("warning: 8 tensor(s) have values beyond the output dtype's range (FP16 holds at most")
    assert line == f"Error: {out}: --verify: tensor 'block.0.weight' has NaN or Inf values"
    assert not out.exists() and temps(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Numerical hazards and --strict


def test_a_diverged_checkpoint_is_warned_with_file_step_and_tensor(tmp_path):
    inputs = make_series(tmp_path / "run", scale={400: 50.0})
    result = run("merge", *inputs, *TARGET, "-o", tmp_path / "ema.safetensors")
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr  # the jump up; the fall back at step 500 is not repeated
    ratio = _norm(inputs[3]) / _norm(inputs[2])
    assert warnings[0].startswith(
        f"warning: {inputs[3]}: the weights' norm at step 400 is {ratio:.3g}x that at step 300"
    )
    assert "tensor 'block." in warnings[0]


def _norm(path: Path) -> float:
    """L2 norm over all floating-point tensors of a file, in float64."""
    state = load_file(path)
    return sum(float((t.double() ** 2).sum()) for t in state.values() if t.is_floating_point()) ** 0.5


def test_a_smooth_series_gives_no_warning(tmp_path):
    inputs = make_series(tmp_path / "run", scale={100: 1.0, 200: 1.5, 300: 2.5, 400: 4.0, 500: 6.0})
    result = run("merge", *inputs, *TARGET, "-o", tmp_path / "ema.safetensors")
    assert result.exit_code == 0 and "warning" not in result.stderr


@pytest.mark.parametrize("hazard", ["nan", "diverged", "plan warning"])
def test_strict_turns_warnings_into_errors_and_writes_nothing(tmp_path, hazard):
    inputs = make_series(tmp_path / "run", scale={400: 50.0} if hazard == "diverged" else None)
    target = TARGET
    if hazard == "nan":
        state = load_file(inputs[2])
        state["block.3.weight"][5] = float("nan")
        save_file(state, str(inputs[2]))
    if hazard == "plan warning":
        target = ["--decay", "0.9"]  # half-life 6.6 steps, far shorter than the 100-step spacing
    out = tmp_path / "out" / "ema.safetensors"
    out.parent.mkdir()
    assert run("merge", *inputs, *target, "-o", tmp_path / "loose.safetensors").exit_code == 0  # warned only
    line = one_error_line(run("merge", *inputs, *target, "-o", out, "--strict"))
    assert line.endswith("(--strict: no output written)")
    expected = {
        "nan": f"Error: {inputs[2]}: tensor 'block.3.weight' (step 300) has NaN or Inf values",
        "diverged": f"Error: {inputs[3]}: the weights' norm at step 400 is {_norm(inputs[3]) / _norm(inputs[2]):.3g}x",
        "plan warning": "Error: decay-0.9: the half-life",
    }[hazard]
    assert line.startswith(expected), line
    assert list(out.parent.iterdir()) == []


def test_no_thread_or_file_outlives_a_job(tmp_path):
    import threading

    def files_open_in(folder: Path) -> list[str]:
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [t for t in targets if t.startswith(str(folder))]

    inputs = make_series(tmp_path / "run", scale={400: 50.0})
    assert run("merge", *inputs, *TARGET, "-o", tmp_path / "a.safetensors").exit_code == 0
    assert run("merge", *inputs, *TARGET, "-o", tmp_path / "b.safetensors", "--strict").exit_code == 1  # aborted
    for thread in [t for t in threading.enumerate() if t.name == "ckpt-ema-hash"]:
        thread.join(timeout=120)  # an idle hash thread ends by itself: wait for that, not for a fixed time
        assert not thread.is_alive()
    gc.collect()  # the readers' memory maps (each holds a descriptor) go with the plan
    if os.path.isdir("/proc/self/fd"):
        assert files_open_in(tmp_path) == []
