"""Fixtures of the server tests: the tiny model folders (once per session) and a running server per module."""

import pytest
from serving import build_models, running_server


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("server-models"))


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    """The server most tests share: a short queue (2), sizes up to 128, long jobs allowed for cancellation."""
    tmp = tmp_path_factory.mktemp("server")
    styles = tmp / "styles.csv"  # A1111's format
    styles.write_text('name,prompt,negative_prompt\n"cinematic","cinematic still of {prompt}, film grain","cartoon"\n'
                      '"sharp","sharp focus",""\n')  # fmt: skip
    with running_server(models_dir, tmp, "--max-queue", "2", "--max-size", "128", "--max-steps", "2000",
                        "--output-dir", str(tmp / "out"), "--styles", str(styles)) as s:  # fmt: skip
        yield s
