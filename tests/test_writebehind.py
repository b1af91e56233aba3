"""The write thread behind the pass (engine/writebehind.py): order, errors, a stuck write and Ctrl-C."""

from __future__ import annotations

import threading

import pytest

from ckpt_ema.engine.writebehind import WriteBehind


def test_tasks_run_in_order_in_one_thread_and_wait_for_waits():
    writes = WriteBehind()
    seen: list[tuple[int, str]] = []
    tickets = [writes.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(50)]
    writes.wait_for(tickets[-1])
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"ckpt-ema-write"}
    assert tickets == list(range(50))
    writes.drain()
    writes.close()


def test_the_first_error_is_raised_in_the_submitting_thread_and_later_tasks_do_not_run():
    writes = WriteBehind()
    ran: list[int] = []

    def fail() -> None:
        raise OSError(28, "No space left on device")

    writes.submit(lambda: ran.append(1))
    writes.submit(fail)
    with pytest.raises(OSError, match="No space"):
        for _ in range(10):  # raised by a later submit or by the drain
            writes.submit(lambda: ran.append(2))
        writes.drain()
    assert ran == [1]
    writes.close()


def test_close_returns_while_a_write_is_stuck_and_drops_the_waiting_tasks():
    writes = WriteBehind(depth=2)
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def stuck() -> None:
        started.set()
        release.wait()
        ran.append("stuck")

    writes.submit(stuck)
    writes.submit(lambda: ran.append("after"))
    assert started.wait(60)
    writes.close()  # does not wait for the stuck write (a dead disk must not hold up Ctrl-C)
    with pytest.raises(RuntimeError, match="closed"):
        writes.submit(lambda: None)
    release.set()
    thread_done = threading.Event()
    threading.Thread(target=lambda: (writes.close(), thread_done.set())).start()
    assert thread_done.wait(60)
    assert "after" not in ran


def test_the_pass_writes_the_same_bytes_as_float64_with_several_outputs_and_small_chunks(tmp_path):
    """The ring of output buffers: chunk c+1 is computed while chunk c is written; every output's bytes are
    the float64 weighted sum rounded to BF16, whatever the chunking."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from ckpt_ema import plan_merge
    from ckpt_ema.engine.merge_pass import MemorySink, MergePass

    rng = np.random.default_rng(3)
    values = [rng.standard_normal(5000).astype(np.float32) for _ in range(5)]
    paths = []
    for i, v in enumerate(values):
        path = tmp_path / f"step-{(i + 1) * 100}.safetensors"
        save_file({"w": v, "b": v[:37].copy()}, str(path))
        paths.append(path)
    plan = plan_merge(paths, decay=[0.99, 0.995, 0.999])
    sinks = [MemorySink(plan.tensors) for _ in plan.outputs]
    for _ in MergePass(plan, sinks, chunk_elements=7):
        pass
    coefficients = plan.coefficient_matrix()
    loaded = [load_file(str(p)) for p in paths]
    for k, sink in enumerate(sinks):
        for name in ("w", "b"):
            expected = sum(coefficients[k, j] * loaded[j][name].astype(np.float64) for j in range(len(paths)))
            got = sink.arrays[name]
            assert got.dtype == np.float32
            assert np.allclose(got, expected, rtol=1e-5, atol=1e-6), (k, name)


def test_together_runs_a_tasks_jobs_at_the_same_time_and_raises_the_first_error():
    """Two jobs that each wait for the other can only finish if they run at once."""
    writes = WriteBehind(workers=2)
    meet = threading.Barrier(2, timeout=60)
    names: list[str] = []

    def job() -> None:
        meet.wait()  # BrokenBarrierError after 60 s if the jobs ran one after the other
        names.append(threading.current_thread().name)

    writes.submit(lambda: writes.together([job, job]))
    writes.drain()
    assert sorted(names) == ["ckpt-ema-write", "ckpt-ema-write-1"]

    def fail() -> None:
        raise OSError(28, "No space left on device")

    ran: list[int] = []
    writes.submit(lambda: writes.together([lambda: ran.append(1), fail, lambda: ran.append(3)]))
    with pytest.raises(OSError, match="No space"):
        writes.drain()
    assert sorted(ran) == [1, 3]  # the other jobs of the task still ran: each output's file stays whole
    writes.close()


def test_close_returns_while_a_helpers_write_is_stuck():
    writes = WriteBehind(workers=2)
    started, release = threading.Event(), threading.Event()

    def stuck() -> None:
        started.set()
        release.wait()

    writes.submit(lambda: writes.together([lambda: None, stuck]))
    assert started.wait(60)
    writes.close()  # returns at once: neither the write thread nor its helper is waited for
    with pytest.raises(RuntimeError, match="closed"):
        writes.together([lambda: None, lambda: None])
    release.set()


def test_with_several_outputs_each_sink_is_called_in_plan_order_one_call_at_a_time(tmp_path, monkeypatch):
    """The outputs are written by two threads at once, each sink by one thread at a time, in plan order."""
    import numpy as np
    from safetensors.numpy import save_file

    from ckpt_ema import plan_merge
    from ckpt_ema.engine import merge_pass

    monkeypatch.setattr(merge_pass, "WRITE_WORKERS", 2)
    rng = np.random.default_rng(5)
    names = [f"layer{i}.w" for i in range(6)]
    paths = []
    for i in range(4):
        path = tmp_path / f"step-{(i + 1) * 100}.safetensors"
        save_file({n: rng.standard_normal(3000 + 7 * k).astype(np.float32) for k, n in enumerate(names)}, str(path))
        paths.append(path)
    plan = plan_merge(paths, decay=[0.99, 0.995, 0.999, 0.9995])

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.threads: set[str] = set()
            self.inside = False

        def write(self, name: str, data: np.ndarray) -> None:
            assert not self.inside, "a sink was called from two threads at once"
            self.inside = True
            self.threads.add(threading.current_thread().name)
            if not self.calls or self.calls[-1] != name:
                self.calls.append(name)
            self.inside = False

    sinks = [Recorder() for _ in plan.outputs]
    for _ in merge_pass.MergePass(plan, sinks, chunk_elements=500):
        pass
    order = [t.name for t in plan.tensors]
    assert all(sink.calls == order for sink in sinks)
    assert set().union(*(sink.threads for sink in sinks)) == {"ckpt-ema-write", "ckpt-ema-write-1"}
