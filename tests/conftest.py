"""Shared pytest set-up: offline hub, the opt-in slow suite, and OpenBLAS loaded before any mlx import."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # anything that tries the hub fails fast instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

import mlx_sd  # noqa: E402,F401  (must precede `import mlx.core` anywhere in the test session)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the full-size parity suite (minutes, ~20 GB)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="full-size run; pass --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
