"""Fuzzing the request validation: schemathesis generates requests from the server's published OpenAPI schema
(valid ones and, deliberately, invalid ones); none may get a 5xx, and every refusal is JSON in the API's shape.

The server runs with tight limits (64 pixels, 2 steps) so that the generated requests that pass validation are
cheap to serve.
"""

import collections

import pytest
from serving import require_serve_extra, running_server

require_serve_extra()

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

EXAMPLES = 15  # per operation and generation mode
LIMITS = ("--max-size", "64", "--max-steps", "2", "--max-images", "2", "--max-batch-size", "2", "--max-queue", "16",
          "--max-body-mb", "1", "--max-prompt-length", "200")  # fmt: skip


@pytest.fixture(scope="module")
def fuzzed(models_dir, tmp_path_factory):
    with running_server(models_dir, tmp_path_factory.mktemp("fuzz"), *LIMITS) as s:
        yield s


STATUSES = collections.Counter()


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    config = schemathesis.Config()  # explicit: no schemathesis.toml discovered from the working directory
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json", config=config)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))  # fmt: skip
def test_no_request_makes_the_server_fail(case, fuzzed):
    response = case.call(base_url=fuzzed.url, timeout=60)
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        if case.operation.path.startswith("/sdapi/"):
            assert set(body) == {"error", "detail", "body", "errors"}, body
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}, body


def test_the_server_is_healthy_after_fuzzing(fuzzed):
    assert fuzzed.get("/health").json()["status"] == "ok"
    r = fuzzed.post("/sdapi/v1/txt2img", json={"prompt": "still here", "width": 64, "height": 64, "steps": 2})
    assert r.status_code == 200
    assert "Traceback" not in fuzzed.output()
    print(f"fuzzing: responses by status {dict(sorted(STATUSES.items()))}")
