"""`make demo` runs end to end and its story holds: a post-hoc EMA beats the last checkpoint, doctor sees the
stalled BF16 EMA, and the closing sweep picks its decay by held-out loss (scored by ``python -m ckpt_ema.demo eval``)."""

from __future__ import annotations

import json
import re

import pytest

from ckpt_ema import demo


@pytest.mark.slow
def test_demo_runs_and_an_ema_beats_the_last_checkpoint(tmp_path, capsys):
    demo.main(str(tmp_path / "demo-out"))
    out = capsys.readouterr().out
    losses = {name.strip(): float(loss) for name, loss in re.findall(r"^(.+?)\s+(\d\.\d{4})", out, re.MULTILINE)}
    last = losses["last checkpoint (no EMA)"]
    best = min(v for k, v in losses.items() if k.startswith("ckpt-ema"))
    assert best < last
    assert losses["trainer's BF16 EMA, decay 0.999"] > best
    assert "<- best" in out
    assert sorted(p.name for p in (tmp_path / "demo-out" / "ema").iterdir())[0] == "decay-0.9.safetensors"

    # doctor: the trainer's BF16 EMA stalled
    assert "most updates are lost: an EMA kept in bf16 at this decay barely learns" in out
    # the sweep: every candidate scored by the demo's eval, the best one kept
    sweep = tmp_path / "demo-out" / "sweep"
    record = json.loads((sweep / "sweep.json").read_text())
    scores = {c["name"]: c["score"] for c in record["candidates"]}
    assert len(scores) == 7 and None not in scores.values()
    assert record["best"] == min(scores, key=scores.get)
    assert sorted(p.name for p in sweep.iterdir()) == [f"{record['best']}.safetensors", "sweep.json"]
    assert scores[record["best"]] < last
    assert demo.evaluate_file(str(sweep / f"{record['best']}.safetensors")) == pytest.approx(
        scores[record["best"]], abs=1e-6
    )
