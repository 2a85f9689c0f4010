"""Load, client disconnects and shutdown: every request answered, none lost or mixed up, the server stays healthy."""

import base64
import io
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image
from serving import require_serve_extra, running_server, wait_for

from mlx_sd.infotext import parse_infotext

require_serve_extra()

CLIENTS = 30
SMALL = {"width": 64, "height": 64, "steps": 2}


def _a1111(url: str, i: int):
    r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": f"load {i}", "seed": 1000 + i, **SMALL}, timeout=120)
    if r.status_code != 200:
        return r.status_code, r.headers.get("retry-after"), r.json(), None
    body = r.json()
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    return 200, None, json.loads(body["info"]), image.info["parameters"]


def _openai(url: str, i: int):
    r = requests.post(url + "/v1/images/generations", timeout=120,
                      json={"prompt": f"load {i}", "seed": 1000 + i, "size": "64x64", "steps": 2})  # fmt: skip
    if r.status_code != 200:
        return r.status_code, r.headers.get("retry-after"), r.json(), None
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    return 200, None, None, image.info["parameters"]


def _native(url: str, i: int):
    r = requests.post(url + "/v1/jobs", json={"prompt": f"load {i}", "seed": 1000 + i, **SMALL}, timeout=120)
    if r.status_code != 202:
        return r.status_code, r.headers.get("retry-after"), r.json(), None
    job_url = r.json()["url"]
    job = wait_for(lambda: (j := requests.get(job_url, timeout=30).json())["status"] in ("done", "failed") and j,
                   timeout=120, interval=0.1, what="a native job")  # fmt: skip
    return 200, None, None, job["result"]["images"][0]["infotext"]


def test_concurrent_requests_are_all_answered_and_never_mixed(server):
    """30 clients at once through all three APIs, 2 places in the queue: each gets its own image or a 503."""
    clients = [_a1111, _openai, _native]
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(clients[i % 3], server.url, i) for i in range(CLIENTS)]
        outcomes = [f.result() for f in futures]
    served = 0
    for i, (status, retry_after, body, infotext) in enumerate(outcomes):
        if status == 200:
            prompt, _, params = parse_infotext(infotext)
            assert (prompt, params["Seed"]) == (f"load {i}", str(1000 + i))  # its own request, nobody else's
            served += 1
        else:
            assert status == 503, body
            assert int(retry_after) >= 1
            message = body["detail"] if "detail" in body else body["error"]["message"]
            assert "queue is full" in message
    assert 3 <= served < CLIENTS  # the worker took some, the short queue turned the rest away
    # Nothing lost or run twice: the server ran exactly the accepted requests.
    runs = [j for j in server.get("/v1/jobs").json()["jobs"] if j["result"] and
            parse_infotext(j["result"]["images"][0]["infotext"] or "")[0].startswith("load ")]  # fmt: skip
    assert len(runs) == served and len({r["id"] for r in runs}) == served
    assert server.get("/health").json() == {"status": "ok", "worker": "idle", "queued": 0, "version": "0.1.0"}
    assert _a1111(server.url, 99)[0] == 200


def test_a_client_that_hangs_up_cancels_its_job(server):
    body = json.dumps({"prompt": "abandoned", "steps": 2000, "width": 64, "height": 64}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        wait_for(lambda: server.get("/sdapi/v1/progress").json()["state"]["sampling_step"] > 0, what="the job")
    job = wait_for(lambda: next((j for j in server.get("/v1/jobs").json()["jobs"]
                                 if j["status"] == "cancelled" and j["source"] == "sdapi-txt2img"), None),
                   timeout=10, what="the abandoned job to be cancelled")  # fmt: skip
    assert job["progress"]["step"] < 2000
    assert _a1111(server.url, 98)[0] == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_shutdown(models_dir, tmp_path, sig):
    """A stop signal cancels the running and queued jobs, answers their clients with 503, and ends the process.

    The exit status is the conventional one: uvicorn re-raises SIGTERM after its graceful shutdown (status
    -SIGTERM, 143 in a shell), and the CLI turns SIGINT's KeyboardInterrupt into 130.
    """
    with running_server(models_dir, tmp_path, "--max-steps", "2000") as srv:
        answers = {}

        def call(name, steps):
            try:
                body = {"prompt": name, "steps": steps, "width": 64, "height": 64}
                answers[name] = requests.post(srv.url + "/sdapi/v1/txt2img", json=body, timeout=60)
            except requests.RequestException as e:  # the connection closed without an answer
                answers[name] = e

        threads = [threading.Thread(target=call, args=("running", 2000))]
        threads[0].start()
        wait_for(lambda: srv.get("/sdapi/v1/progress").json()["state"]["sampling_step"] > 0, what="the job")
        threads.append(threading.Thread(target=call, args=("queued", 2)))
        threads[1].start()
        wait_for(lambda: srv.get("/health").json()["queued"] == 1, what="the queued job")
        start = time.monotonic()
        assert srv.stop(sig) == {signal.SIGTERM: -signal.SIGTERM, signal.SIGINT: 130}[sig]
        assert time.monotonic() - start < 20
        for t in threads:
            t.join(10)
        for name in ("running", "queued"):
            answer = answers[name]
            assert isinstance(answer, requests.Response), (name, answer)
            assert answer.status_code == 503 and "shut down" in answer.json()["detail"], answer.text
        assert "Traceback" not in srv.output()
