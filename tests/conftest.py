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


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny random-weight SD 1.x model: (its diffusers components, our `Pipeline` on the converted folder), one per
    test module. Modules that need another (other seeds, embeddings loaded) define their own `sd1`."""
    from tiny_pipelines import mlx_folder, tiny_components

    from mlx_sd.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("sd1")
    parts = tiny_components(tmp, "sd1")
    return parts, Pipeline(mlx_folder(parts, tmp / "mlx", "sd1"))
