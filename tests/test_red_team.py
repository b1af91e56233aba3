"""Issue 12: hostile folders, interrupted runs, bad input that gave tracebacks, silent surprises.

Every test drives the command line (``ckpt_ema.cli.main`` through click's ``CliRunner``, or ``python -m
ckpt_ema`` in a subprocess), so that none depends on where a function lives inside the package. Expected
values come from the files the test wrote (bytes, modes, values chosen so that any EMA of them is known),
never from the code under test. Subprocesses are synchronised on events (a pipe the child writes to when
it reaches a given moment, then blocks on), never on sleeps.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import shlex
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckpt_ema.cli import main

STEPS = [100, 200, 300, 400, 500]
TARGET = ["--half-life", "100"]
TEMP_MARKER = ".ckpt-ema-tmp-"
ROOT = Path(__file__).resolve().parent.parent
# C0 controls but tab and newline, DEL, C1 controls: what a terminal may act on
# Each test below reproduced one hole of issue 12 on the code before its fix (then marked xfail, strict).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def run(*args, **kwargs) -> CliRunner.Result:
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def one_error_line(result: CliRunner.Result) -> str:
    """The run failed with exit 1, one ``Error:`` line on stderr, and no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if TEMP_MARKER in p.name) if folder.exists() else []


def make_series(folder: Path, value=None, steps=STEPS, dtype=torch.float32, name="step-{:06d}.safetensors", **meta):
    """Safetensors checkpoints; ``w`` holds ``value`` (default: the step) so that any EMA of them is known."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in steps:
        fill = float(step) if value is None else value
        state = {"w": torch.full((16,), fill).to(dtype), "counter": torch.tensor([step], dtype=torch.int64)}
        path = folder / name.format(step)
        save_file(state, str(path), metadata={k: v.format(step=step) for k, v in meta.items()} or None)
        paths.append(path)
    return paths


def make_hf_series(root: Path, steps=STEPS, extra=None) -> Path:
    """Hugging Face ``checkpoint-N/`` folders: ``model.safetensors`` (every value 1.0), ``config.json``."""
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": torch.ones(8), "n": torch.tensor([step])}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"model_type": "tiny"}')
        if extra:
            extra(folder, step)
    return root


def write_raw_safetensors(path: Path, header: bytes, data: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


# ---------------------------------------------------------------------------------------------------------
# Security: symbolic links in folder checkpoints are never followed out of the checkpoint


def _no_secret_anywhere(out: Path, secret: bytes) -> None:
    if out.exists():
        for path in out.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret not in path.read_bytes(), path


def _link_config_out(tmp_path: Path, secret: bytes):
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "shadow").write_bytes(secret)

    def extra(folder: Path, step: int) -> None:
        if step == STEPS[-1]:
            (folder / "config.json").unlink()
            (folder / "config.json").symlink_to(outside / "shadow")

    return extra


def _link_folder_in_tokenizer(tmp_path: Path, secret: bytes):
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "id_rsa").write_bytes(secret)

    def extra(folder: Path, step: int) -> None:
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.txt").write_text("a b c")
        if step == STEPS[-1]:
            (folder / "tokenizer" / "keys").symlink_to(outside, target_is_directory=True)

    return extra


def _link_tokenizer_folder(tmp_path: Path, secret: bytes):
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "vocab.txt").write_bytes(secret)

    def extra(folder: Path, step: int) -> None:
        if step == STEPS[-1]:
            (folder / "tokenizer").symlink_to(outside, target_is_directory=True)

    return extra


@pytest.mark.parametrize(
    "attack", [_link_config_out, _link_folder_in_tokenizer, _link_tokenizer_folder], ids=["file", "inner", "folder"]
)
def test_a_symlink_out_of_the_checkpoint_is_never_copied(tmp_path, attack):
    secret = b"root:$6$secret-hash:19000:0:99999:7:::\n"
    run_dir = make_hf_series(tmp_path / "run", extra=attack(tmp_path, secret))
    out = tmp_path / "ema"
    line = one_error_line(run("merge", run_dir, *TARGET, "-o", out))
    assert "symbolic link" in line and str(tmp_path / "private") in line, line
    _no_secret_anywhere(out, secret)
    assert not out.exists() and temps(tmp_path) == []


@pytest.mark.parametrize(
    "attack", [_link_config_out, _link_folder_in_tokenizer, _link_tokenizer_folder], ids=["file", "inner", "folder"]
)
def test_inspect_flags_a_symlink_out_of_the_checkpoint(tmp_path, attack):
    """inspect reads headers only, but says which of the newest checkpoint's files a folder output refuses."""
    run_dir = make_hf_series(tmp_path / "run", extra=attack(tmp_path, b"secret"))
    result = run("inspect", run_dir)
    assert result.exit_code == 1, result.output
    refused = [line for line in result.output.splitlines() if line.startswith("  refused ")]
    assert len(refused) == 1 and "symbolic link" in refused[0] and str(tmp_path / "private") in refused[0], refused
    assert str(run_dir / f"checkpoint-{STEPS[-1]}") in refused[0]
    assert "--format safetensors" in result.output.splitlines()[-1]
    as_json = json.loads(run("inspect", run_dir, "--json").output)
    assert [len(c["refused"]) for c in as_json["checkpoints"]] == [0] * (len(STEPS) - 1) + [1]
    assert not as_json["series"]["ok"]
    # what the verdict suggests works, and copies nothing
    out = tmp_path / "ema.safetensors"
    assert run("merge", run_dir, *TARGET, "--format", "safetensors", "-o", out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors", "private", "run"]


def test_inspect_is_quiet_about_links_that_stay_inside(tmp_path):
    def extra(folder: Path, step: int) -> None:
        (folder / "tokenizer_config.json").symlink_to("config.json")

    result = run("inspect", make_hf_series(tmp_path / "run", extra=extra))
    assert result.exit_code == 0 and "refused" not in result.output, result.output


def test_a_symlink_inside_the_checkpoint_is_copied_as_the_file_it_names(tmp_path):
    def extra(folder: Path, step: int) -> None:
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "tokenizer_config.json").write_text(f'{{"step": {step}}}')
        (folder / "tokenizer_config.json").symlink_to("tokenizer/tokenizer_config.json")

    run_dir = make_hf_series(tmp_path / "run", extra=extra)
    out = tmp_path / "ema"
    result = run("merge", run_dir, *TARGET, "-o", out)
    assert result.exit_code == 0, result.output
    copied = out / "tokenizer_config.json"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_text() == f'{{"step": {STEPS[-1]}}}'
    assert (out / "tokenizer" / "tokenizer_config.json").read_text() == f'{{"step": {STEPS[-1]}}}'


def test_a_shard_that_links_out_of_the_checkpoint_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"w": torch.ones(8), "n": torch.tensor([0])}, str(outside / "stolen.safetensors"))

    def extra(folder: Path, step: int) -> None:
        if step == STEPS[-1]:
            (folder / "model.safetensors").unlink()
            (folder / "model.safetensors").symlink_to(outside / "stolen.safetensors")

    run_dir = make_hf_series(tmp_path / "run", extra=extra)
    line = one_error_line(run("merge", run_dir, *TARGET, "-o", tmp_path / "ema"))
    assert "model.safetensors" in line and "symbolic link" in line, line


def test_a_hugging_face_cache_snapshot_is_read_through_its_links(tmp_path):
    """``models--x/snapshots/REV/`` links each file to ``../../blobs/HASH``: the hub's own layout is accepted."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    save_file({"w": torch.full((8,), 2.0), "n": torch.tensor([0])}, str(repo / "blobs" / "aaaa"))
    (repo / "blobs" / "cccc").write_text('{"model_type": "tiny"}')
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/aaaa")
    (snapshot / "config.json").symlink_to("../../blobs/cccc")
    run_dir = make_hf_series(tmp_path / "run")
    out = tmp_path / "ema"
    result = run("merge", run_dir, "--init", snapshot, *TARGET, "-o", out)
    assert result.exit_code == 0, result.output


def test_an_index_entry_outside_the_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.ones(8)}, str(outside))

    def extra(folder: Path, step: int) -> None:
        (folder / "model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": {"w": "../../elsewhere.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    run_dir = make_hf_series(tmp_path / "run", extra=extra)
    line = one_error_line(run("merge", run_dir, *TARGET, "-o", tmp_path / "ema"))
    assert "model.safetensors.index.json" in line and "elsewhere.safetensors" in line, line


# ---------------------------------------------------------------------------------------------------------
# Security: sweep --eval never lets a path run commands, whatever the quoting

EVAL_SCRIPT = """
import os, sys
with open(sys.argv[1], "a") as record:
    record.write(sys.argv[2] + "\\n")
print(os.path.getsize(sys.argv[2]))
"""


@pytest.mark.parametrize(
    "quoting",
    ["{path}", "'{path}'", '"{path}"'],
    ids=["bare", "single", "double"],
)
def test_sweep_eval_substitutes_the_path_safely_whatever_the_quoting(tmp_path, monkeypatch, quoting):
    monkeypatch.chdir(tmp_path)  # where an injected `touch` would land
    inputs = make_series(tmp_path / "run")
    script = tmp_path / "score.py"
    script.write_text(EVAL_SCRIPT)
    record = tmp_path / "record.txt"
    evil = tmp_path / "o'$(touch PWNED1)'\"$(touch PWNED2)\";touch PWNED3;`touch PWNED4`"
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(record))} {quoting}"
    result = run("sweep", *inputs, *TARGET, "-o", evil, "--eval", command)
    assert sorted(p.name for p in tmp_path.glob("PWNED*")) == []
    assert result.exit_code == 0, result.output
    (candidate,) = evil.glob("*.safetensors")
    assert record.read_text().splitlines() == [str(candidate)]
    assert json.loads((evil / "sweep.json").read_text())["candidates"][0]["score"] == candidate.stat().st_size


# ---------------------------------------------------------------------------------------------------------
# Security: control characters from files are escaped in everything printed


def _printable(result: CliRunner.Result) -> None:
    for stream in (result.stdout, result.stderr):
        assert not CONTROL.search(stream), repr(stream)
        assert not any(line.startswith("forged") for line in stream.splitlines()), stream


def test_control_characters_in_kohya_sessions_are_escaped(tmp_path):
    a = make_series(tmp_path / "a", steps=[100, 200], ss_session_id="\x1b[31mred\x1b[0m")
    b = make_series(tmp_path / "a", steps=[300], ss_session_id="x\r\nforged: ok\x07")
    result = run("merge", *a, *b, *TARGET, "-o", tmp_path / "ema.safetensors")
    one_error_line(result)
    _printable(result)
    result = run("inspect", *a, *b)
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    _printable(result)
    assert "\\x1b[31mred" in result.stdout  # shown, escaped


def test_control_characters_in_tensor_names_and_paths_are_escaped(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for step in STEPS:
        name = "w\x1b[2J" if step == STEPS[-1] else "w"
        value = torch.full((4,), float("nan") if step == 300 else 1.0)
        save_file({name: value, "v\rforged": torch.ones(2)}, str(folder / f"step-{step:06d}.safetensors"))
    result = run("merge", folder, *TARGET, "-o", tmp_path / "ema.safetensors")
    one_error_line(result)
    _printable(result)
    nan_run = tmp_path / "nan"
    nan_run.mkdir()
    for step in STEPS:
        value = torch.full((4,), float("nan") if step == 300 else 1.0)
        save_file({"w\rforged": value}, str(nan_run / f"step-{step:06d}\nforged.safetensors"))
    result = run("merge", nan_run, *TARGET, "-o", tmp_path / "ema.safetensors")
    assert result.exit_code == 0, result.output
    assert "NaN" in result.stderr
    _printable(result)
    result = run("inspect", nan_run)
    _printable(result)


def test_control_characters_in_a_lightning_version_are_escaped(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for step in STEPS:
        checkpoint = {
            "pytorch-lightning_version": "2.2\x1b]0;owned\x07",
            "global_step": step,
            "epoch": 0,
            "state_dict": {"w": torch.ones(4)},
        }
        torch.save(checkpoint, folder / f"epoch=0-step={step}.ckpt")
    result = run("inspect", folder)
    assert result.exit_code == 0, result.output
    _printable(result)
    assert "\\x1b]0;owned\\x07" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# Security: outputs keep the inputs' permissions (the most restrictive of them)


def test_a_file_output_keeps_the_most_restrictive_mode_of_the_inputs(tmp_path):
    inputs = make_series(tmp_path / "run")
    for path in inputs:
        path.chmod(0o640)
    inputs[2].chmod(0o600)
    out = tmp_path / "out" / "ema.safetensors"
    assert run("merge", *inputs, *TARGET, "--decay", "0.99", "-o", out.parent).exit_code == 0
    for path in out.parent.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_folder_output_keeps_the_inputs_mode(tmp_path):
    run_dir = make_hf_series(tmp_path / "run")
    for path in run_dir.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    out = tmp_path / "ema"
    assert run("merge", run_dir, *TARGET, "-o", out).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_a_dcp_output_keeps_the_inputs_mode(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    run_dir = tmp_path / "run"
    with warnings.catch_warnings():  # dcp.save in one process, without a process group, says so
        warnings.simplefilter("ignore")
        for step in (100, 200, 300):
            dcp.save({"w": torch.full((8,), float(step))}, checkpoint_id=str(run_dir / f"step-{step}"))
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    out = tmp_path / "ema"
    result = run("merge", run_dir, "--steps", "100,200,300", "--half-life", "100", "-o", out)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


# ---------------------------------------------------------------------------------------------------------
# Security: a legacy (pre-1.6) pickle with code is reported as code, not as a file to re-save


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.sentinel))}",))


def test_a_legacy_pickle_with_code_says_it_would_run_code(tmp_path):
    sentinel = tmp_path / "RAN"
    folder = tmp_path / "run"
    folder.mkdir()
    for step in STEPS:
        state = {"w": torch.ones(4), "hook": _Evil(sentinel)}
        torch.save(state, folder / f"step-{step:06d}.pt", _use_new_zipfile_serialization=False)
    line = one_error_line(run("merge", folder, *TARGET, "-o", tmp_path / "ema.safetensors"))
    assert "would run code" in line and "system" in line, line
    assert "re-save" not in line
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------------------
# Interrupted runs, in a real subprocess stopped at a chosen moment (an event, never a sleep)

CHILD = r"""
import builtins, os, sys
moment, ready, hold = os.environ["RT_MOMENT"], int(os.environ["RT_READY"]), int(os.environ["RT_HOLD"])
MARK = ".ckpt-ema-tmp-"

def stop_here(what):
    os.write(ready, (what + "\n").encode())
    os.read(hold, 1)  # blocks until the test releases it or a signal interrupts it

def is_temp(fd):
    try:
        return MARK in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False

if moment == "import":
    real_import = builtins.__import__
    STARTED = []
    def hooked_import(name, *args, **kwargs):
        # the first of the heavy imports of start-up (ckpt-ema's own handlers are installed before it)
        if name in ("click", "numpy", "torch") and name not in sys.modules and not STARTED:
            STARTED.append(name)
            stop_here("import")
        return real_import(name, *args, **kwargs)
    builtins.__import__ = hooked_import
elif moment == "temp":  # the temporary file (or folder) exists; the writer has not seen its descriptor yet
    real_open, real_mkdir = os.open, os.mkdir
    def hooked_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if MARK in os.fspath(path) and flags & os.O_CREAT:
            stop_here("temp")
        return fd
    def hooked_mkdir(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if MARK in os.fspath(path):
            stop_here("temp")
    os.open, os.mkdir = hooked_open, hooked_mkdir
elif moment == "write":  # the header is written, the first tensor is being written
    real_fdopen = os.fdopen
    class Held:
        def __init__(self, file):
            self.file, self.calls = file, 0
        def write(self, data):
            self.calls += 1
            if self.calls == 2:
                stop_here("write")
            return self.file.write(data)
        def __getattr__(self, name):
            return getattr(self.file, name)
    def hooked_fdopen(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)
        return Held(file) if is_temp(fd) else file
    os.fdopen = hooked_fdopen
elif moment == "fsync":  # the temporary file is complete, about to be renamed into place
    real_fsync = os.fsync
    def hooked_fsync(fd):
        if is_temp(fd):
            stop_here("fsync")
        return real_fsync(fd)
    os.fsync = hooked_fsync

entry = os.environ.get("RT_ENTRY")
sys.argv = ["ckpt-ema", *sys.argv[1:]]
if entry:
    module, _, function = entry.partition(":")
    sys.exit(getattr(__import__(module, fromlist=[function]), function)())
import runpy
runpy.run_module("ckpt_ema", run_name="__main__", alter_sys=True)
"""


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """``ckpt-ema ARGS`` in a subprocess that stops at ``moment`` and says so, until released or signalled."""

    def __init__(self, args, moment: str, entry: str | None = None, env=None) -> None:
        self.ready_r, ready_w = os.pipe()
        hold_r, self.hold_w = os.pipe()
        environment = {**os.environ, **(env or {}), "RT_MOMENT": moment, "RT_READY": str(ready_w)}
        environment["RT_HOLD"] = str(hold_r)
        environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
        if entry:
            environment["RT_ENTRY"] = entry
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, *map(str, args)],
            pass_fds=(ready_w, hold_r),
            env=environment,
            # Ctrl-C's default disposition, as in a terminal, even when the test runner was started with
            # SIGINT ignored (a background job of a non-interactive shell), which the child would inherit
            preexec_fn=_default_sigint,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(ready_w)
        os.close(hold_r)

    def reached(self, timeout: float = 300.0) -> str:
        """Wait until the child reports its moment (or fail with its output if it ends first)."""
        readable, _, _ = select.select([self.ready_r], [], [], timeout)
        text = os.read(self.ready_r, 100).decode() if readable else ""
        if not text:
            self.process.kill()
            stdout, stderr = self.process.communicate()
            pytest.fail(f"the child never reached its moment: {stdout}{stderr}")
        return text.strip()

    def release(self) -> None:
        os.write(self.hold_w, b"x")

    def finish(self, timeout: float = 300.0) -> tuple[int, str, str]:
        stdout, stderr = self.process.communicate(timeout=timeout)
        os.close(self.ready_r)
        os.close(self.hold_w)
        return self.process.returncode, stdout, stderr


@pytest.mark.parametrize(
    "moment, signum, folder_output",
    [
        ("temp", signal.SIGINT, False),
        ("temp", signal.SIGTERM, True),
        ("write", signal.SIGTERM, False),
        ("fsync", signal.SIGINT, True),
    ],
)
def test_a_signal_at_any_moment_removes_every_temporary_file(tmp_path, moment, signum, folder_output):
    if folder_output:
        source = make_hf_series(tmp_path / "run")
        out = tmp_path / "out" / "ema"
    else:
        source = tmp_path / "run"
        make_series(source)
        out = tmp_path / "out" / "ema.safetensors"
    child = Child(["merge", source, *TARGET, "-o", out], moment)
    assert child.reached() == moment
    child.process.send_signal(signum)
    code, stdout, stderr = child.finish()
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    assert code == (130 if signum == signal.SIGINT else 143), stderr
    assert stderr.strip().splitlines() == [f"ckpt-ema: {word}; no output written, temporary files removed"]
    assert not out.exists() and list(out.parent.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("entry", ["-m", "script"])
def test_a_signal_during_start_up_gives_one_line(tmp_path, signum, entry):
    inputs = make_series(tmp_path / "run")
    script_entry = None
    if entry == "script":  # what the installed ckpt-ema command runs: pyproject's [project.scripts] entry
        text = (ROOT / "pyproject.toml").read_text()
        script_entry = re.search(r'^ckpt-ema\s*=\s*"([^"]+)"', text, re.MULTILINE).group(1)
    child = Child(["merge", *inputs, *TARGET, "-o", tmp_path / "ema.safetensors"], "import", entry=script_entry)
    assert child.reached() == "import"
    child.process.send_signal(signum)
    code, stdout, stderr = child.finish()
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    assert code == (130 if signum == signal.SIGINT else 143), (code, stderr)
    assert stderr.strip().splitlines() == [f"ckpt-ema: {word}; no output written, temporary files removed"]


def test_two_merges_to_the_same_output_at_once_the_second_is_refused(tmp_path):
    inputs = make_series(tmp_path / "run")
    out = tmp_path / "ema.safetensors"
    first = Child(["merge", *inputs, *TARGET, "-o", out], "fsync")
    assert first.reached() == "fsync"  # the first run's file is complete, not yet renamed into place
    second = run("merge", *inputs, *TARGET, "--interp", "hold", "-o", out, "--force")
    first.release()
    code, stdout, stderr = first.finish()
    assert code == 0, stderr
    line = one_error_line(second)
    assert str(out) in line and "another ckpt-ema run" in line, line
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ckpt_ema.interp"] == "linear"  # the first run's output, whole
    assert temps(tmp_path) == []


def test_a_bogus_kernel_setting_is_one_line_and_leaves_no_temporary_file(tmp_path):
    inputs = make_series(tmp_path / "run")
    out = tmp_path / "out" / "ema.safetensors"
    line = one_error_line(run("merge", *inputs, *TARGET, "-o", out, env={"CKPT_EMA_KERNEL": "bogus"}))
    assert "CKPT_EMA_KERNEL" in line and "bogus" in line, line
    assert not out.exists() and temps(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# Bad input that gave tracebacks


@pytest.mark.parametrize(
    "weight_map",
    ["{}", '{"w": ["model-1.safetensors"]}', '{"w": 1}', '{"w": {"x": "y"}}', "[" * 100_000 + "]" * 100_000],
    ids=["empty", "list", "int", "dict", "deep"],
)
def test_a_hostile_index_is_one_line(tmp_path, weight_map):
    def extra(folder: Path, step: int) -> None:
        (folder / "model.safetensors").rename(folder / "model-1.safetensors")
        (folder / "model.safetensors.index.json").write_text(f'{{"metadata": {{}}, "weight_map": {weight_map}}}')

    run_dir = make_hf_series(tmp_path / "run", extra=extra)
    line = one_error_line(run("merge", run_dir, *TARGET, "-o", tmp_path / "ema"))
    assert "model.safetensors.index.json" in line, line
    result = run("inspect", run_dir)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert "model.safetensors.index.json" in result.stdout + result.stderr


def test_an_f8_e4m3_tensor_with_nan_is_a_warning(tmp_path):
    inputs = make_series(tmp_path / "run", value=0.5, dtype=torch.float8_e4m3fn)
    state = load_file(inputs[2])
    state["w"][3] = float("nan")
    save_file(state, str(inputs[2]))
    out = tmp_path / "ema.safetensors"
    result = run("merge", *inputs, *TARGET, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"warning: {inputs[2]}: tensor 'w' (step 300) has NaN or Inf values" in result.stderr
    merged = load_file(out)["w"].float()
    assert torch.isnan(merged[3]) and torch.all(merged[torch.arange(16) != 3] == 0.5)


def test_lora_alphas_that_are_nan_in_every_file_are_copied(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for step in STEPS:
        state = {
            "lora_unet_x.lora_down.weight": torch.full((2, 4), 0.25),
            "lora_unet_x.lora_up.weight": torch.full((4, 2), 0.5),
            "lora_unet_x.alpha": torch.tensor(float("nan")),
        }
        save_file(state, str(folder / f"lora-step{step:08d}.safetensors"))
    out = tmp_path / "ema.safetensors"
    result = run("merge", folder, *TARGET, "-o", out)
    assert result.exit_code == 0, result.output
    merged = load_file(out)
    assert torch.isnan(merged["lora_unet_x.alpha"])
    assert torch.allclose(merged["lora_unet_x.lora_down.weight"], torch.full((2, 4), 0.25))


def test_a_tensor_name_that_is_not_utf8_is_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for step in STEPS:
        header = b'{"w\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
        write_raw_safetensors(folder / f"step-{step:06d}.safetensors", header, struct.pack("<2f", 1.0, 2.0))
    out = tmp_path / "ema.safetensors"
    line = one_error_line(run("merge", folder, *TARGET, "-o", out))
    assert "step-000100.safetensors" in line and "UTF-8" in line, line
    assert not out.exists()


@pytest.mark.slow
def test_an_output_header_stays_within_the_limit_of_the_safetensors_library(tmp_path):
    limit = 100_000_000  # safetensors refuses longer headers (HeaderTooLarge)
    inputs = make_series(tmp_path / "run")
    big = {"w": torch.full((16,), 500.0), "counter": torch.tensor([500])}
    save_file(big, str(inputs[-1]), metadata={"ss_tag_frequency": "x" * (limit - 1000)})
    with safe_open(str(inputs[-1]), "pt") as f:  # the input itself is readable
        assert len(f.metadata()["ss_tag_frequency"]) == limit - 1000
    out = tmp_path / "ema.safetensors"
    line = one_error_line(run("merge", *inputs, *TARGET, "-o", out))
    assert "100,000,000" in line and "ss_tag_frequency" in line, line
    assert not out.exists() and temps(tmp_path) == []


def test_batch_reports_a_failing_run_and_does_the_others(tmp_path):
    def hostile(folder: Path, step: int) -> None:
        (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": ["model.safetensors"]}}')

    bad = make_hf_series(tmp_path / "runs" / "bad", extra=hostile)
    good = make_hf_series(tmp_path / "runs" / "good")
    f8 = tmp_path / "runs" / "f8"
    inputs = make_series(f8, value=0.5, dtype=torch.float8_e4m3fn)
    state = load_file(inputs[0])
    state["w"][0] = float("nan")
    save_file(state, str(inputs[0]))
    out = tmp_path / "out"
    result = run("batch", bad, good, f8, *TARGET, "-o", out)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, repr(result.exception)
    assert "1 of 3 runs failed: bad" in result.stderr
    assert torch.equal(load_file(out / "good" / "half_life-100" / "model.safetensors")["w"], torch.ones(8))
    assert (out / "f8" / "half_life-100.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------
# Silent surprises


def test_fp16_overflow_is_refused_unless_allowed_and_names_the_tensor(tmp_path):
    inputs = make_series(tmp_path / "run", value=1e6)
    out = tmp_path / "ema.safetensors"
    line = one_error_line(run("merge", *inputs, *TARGET, "--dtype", "fp16", "-o", out))
    assert "'w'" in line and "--allow-overflow" in line and "65504" in line, line
    assert not out.exists() and temps(tmp_path) == []
    result = run("merge", *inputs, *TARGET, "--dtype", "fp16", "--allow-overflow", "-o", out)
    assert result.exit_code == 0, result.output
    assert "'w'" in result.stderr and "65504" in result.stderr
    assert torch.isinf(load_file(out)["w"]).all()


@pytest.mark.parametrize("kind", ["dangling", "fifo", "folder"])
def test_a_series_folder_says_what_it_skipped(tmp_path, kind):
    folder = tmp_path / "run"
    make_series(folder)
    odd = folder / "step-000250.safetensors"
    {"dangling": lambda: odd.symlink_to(tmp_path / "gone.safetensors"), "fifo": lambda: os.mkfifo(odd),
     "folder": odd.mkdir}[kind]()  # fmt: skip
    out = tmp_path / "ema.safetensors"
    result = run("merge", folder, *TARGET, "-o", out)
    assert result.exit_code == 0, result.output
    assert any("step-000250.safetensors" in line and "skipped" in line for line in result.stderr.splitlines()), (
        result.stderr
    )
    newest = folder / "step-000600.safetensors"
    odd.rename(newest) if kind != "dangling" else newest.symlink_to(tmp_path / "gone.safetensors")
    line = one_error_line(run("merge", folder, *TARGET, "-o", tmp_path / "ema2.safetensors"))
    assert "step-000600.safetensors" in line, line


def _merge_many(tmp_path: Path, count: int, limit: int) -> None:
    folder = tmp_path / "run"
    make_series(folder, value=0.25, steps=range(1, count + 1))
    out = tmp_path / "ema.safetensors"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        result = run("merge", folder, "--half-life", "50", "-q", "-o", out)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert result.exit_code == 0, result.output
    merged = load_file(out)
    assert torch.allclose(merged["w"], torch.full((16,), 0.25)) and merged["counter"].tolist() == [count]


def test_open_files_stay_bounded_with_a_long_series(tmp_path):
    _merge_many(tmp_path, 400, 256)  # more files than the limit; 10,000 in the slow test


@pytest.mark.slow
def test_ten_thousand_checkpoints_with_ulimit_256(tmp_path):
    _merge_many(tmp_path, 10_000, 256)


def test_an_output_that_is_a_dangling_symlink_is_refused_without_force(tmp_path):
    inputs = make_series(tmp_path / "run")
    out = tmp_path / "ema.safetensors"
    out.symlink_to(tmp_path / "nowhere.safetensors")
    line = one_error_line(run("merge", *inputs, *TARGET, "-o", out))
    assert str(out) in line and "--force" in line, line
    assert out.is_symlink()
    assert run("merge", *inputs, *TARGET, "-o", out, "--force").exit_code == 0
    assert out.is_file() and not out.is_symlink() and not (tmp_path / "nowhere.safetensors").exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_output_that_is_not_a_regular_file_is_never_replaced(tmp_path, kind):
    inputs = make_series(tmp_path / "run")
    out = tmp_path / "ema.safetensors"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        try:
            os.mknod(out, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("creating a device node needs root")
    line = one_error_line(run("merge", *inputs, *TARGET, "-o", out, "--force"))
    assert str(out) in line and "not a regular file" in line, line
    mode = os.lstat(out).st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)
