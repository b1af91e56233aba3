"""`make demo` runs end to end and its story holds: a post-hoc EMA beats the last checkpoint."""

from __future__ import annotations

import re

from ckpt_ema import demo


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
