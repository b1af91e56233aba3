"""Shared test set-up: the ``slow`` marker (deselected by ``make test``, run by ``make test-slow``) and an environment without the
user's ckpt-ema settings, so that every test sees the defaults unless it sets them itself."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: a long test (real training, many processes); make test skips it, make test-slow runs it"
    )


@pytest.fixture(autouse=True)
def _default_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPT_EMA_KERNEL", raising=False)
