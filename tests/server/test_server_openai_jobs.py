"""The OpenAI Images API through the `openai` SDK, unmodified, and the native job API with its event stream."""

import base64
import io
import json
import time

import numpy as np
import pytest
import requests
from PIL import Image
from serving import require_serve_extra, wait_for

from mlx_sd.infotext import parse_infotext

require_serve_extra()

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png(image: Image.Image) -> io.BytesIO:
    out = io.BytesIO()
    image.save(out, "PNG")
    out.seek(0)
    return out


def test_openai_generate(client, server):
    result = client.images.generate(prompt="a boat", model="dall-e-3", n=2, size="64x72",
                                    extra_body={"steps": 2, "seed": 9, "negative_prompt": "fog"})  # fmt: skip
    assert len(result.data) == 2 and result.size == "64x72" and result.output_format == "png"
    images = [decode(d.b64_json) for d in result.data]
    assert [im.size for im in images] == [(64, 72), (64, 72)]
    prompts = [parse_infotext(im.info["parameters"]) for im in images]
    assert [(p[0], p[1], p[2]["Seed"], p[2]["Steps"]) for p in prompts] == [("a boat", "fog", "9", "2"),
                                                                          ("a boat", "fog", "10", "2")]  # fmt: skip

    urls = client.images.generate(prompt="a url", model="tiny-b", size="64x64", response_format="url",
                                  extra_body={"steps": 2})  # fmt: skip
    fetched = requests.get(urls.data[0].url, timeout=30)
    assert fetched.headers["content-type"] == "image/png"
    assert "Model hash: b2b2b2b2b2" in Image.open(io.BytesIO(fetched.content)).info["parameters"]

    jpeg = client.images.generate(prompt="a jpeg", size="64x64", output_format="jpeg", extra_body={"steps": 2})
    assert decode(jpeg.data[0].b64_json).format == "JPEG"


def test_openai_edit_with_mask(client):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 32))  # OpenAI: transparent = edit here
    result = client.images.edit(
        image=("in.png", png(init), "image/png"), mask=("mask.png", png(mask), "image/png"), prompt="a hat",
        size="64x64", extra_body={"steps": 3, "strength": 1.0, "seed": 2},
    )  # fmt: skip
    out = np.asarray(decode(result.data[0].b64_json).convert("RGB"), dtype=np.int16)
    original = np.asarray(init, dtype=np.int16)
    kept = np.ones((64, 64), bool)
    kept[:32, :32] = False
    np.testing.assert_array_equal(out[kept], original[kept])
    assert np.abs(out[~kept] - original[~kept]).mean() > 10

    whole = client.images.edit(image=("in.png", png(init), "image/png"), prompt="img2img", extra_body={"steps": 4})
    assert decode(whole.data[0].b64_json).size == (64, 64)  # "auto" size: the image's own


def test_openai_errors_and_models(client):
    assert [m.id for m in client.models.list()] == ["tiny-a", "tiny-b"]
    assert client.models.retrieve("tiny-b").owned_by == "mlx-sd"
    with pytest.raises(openai.UnprocessableEntityError, match="size"):
        client.images.generate(prompt="x", size="65x64")
    with pytest.raises(openai.NotFoundError, match="tiny-a"):
        client.images.generate(prompt="x", model="no-such-model")
    with pytest.raises(openai.UnprocessableEntityError, match="partial_images"):
        client.images.generate(prompt="x", size="64x64", stream=True, partial_images=4)
    with pytest.raises(openai.UnprocessableEntityError, match="mask"):
        client.images.edit(image=("a.png", png(Image.new("RGB", (64, 64))), "image/png"),
                           mask=("m.png", png(Image.new("RGBA", (32, 32))), "image/png"), prompt="x")  # fmt: skip
    with pytest.raises(openai.UnprocessableEntityError, match="image"):
        client.images.edit(image=("a.png", io.BytesIO(b"not an image"), "image/png"), prompt="x")


def test_openai_stream(client, server):
    """stream=true through the SDK: typed partial-image events, then one completed event per image, the same
    images as without streaming."""
    params = {"prompt": "a stream", "size": "64x72", "n": 2, "extra_body": {"steps": 12, "seed": 4}}
    plain = client.images.generate(**params)
    events = list(client.images.generate(**params, stream=True, partial_images=2))
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert events == partials + completed and len(completed) == 2
    # OpenAI: fewer partial images than asked for when the image is done sooner
    assert 1 <= len(partials) <= 2 and [e.partial_image_index for e in partials] == list(range(len(partials)))
    assert all(e.size == "64x72" and e.output_format == "png" and e.background == "opaque" for e in events)
    assert decode(partials[0].b64_json).size == (64, 72)  # the latent preview, scaled to the image's size
    for event, data in zip(completed, plain.data, strict=True):
        np.testing.assert_array_equal(np.asarray(decode(event.b64_json)), np.asarray(decode(data.b64_json)))
    assert completed[0].usage.total_tokens == 0

    init = Image.fromarray(np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    edits = list(client.images.edit(image=("in.png", png(init), "image/png"), prompt="edit", stream=True,
                                    partial_images=0, output_format="jpeg", extra_body={"steps": 3}))  # fmt: skip
    assert [e.type for e in edits] == ["image_edit.completed"]
    assert decode(edits[0].b64_json).format == "JPEG" and edits[0].size == "64x64"

    # Interrupted mid-stream (A1111's interrupt stops the running job): the SDK raises the stream's error event.
    stream = client.images.generate(prompt="long", size="64x64", stream=True, partial_images=3,
                                    extra_body={"steps": 400})  # fmt: skip
    with pytest.raises(openai.APIError, match="cancelled"):
        for event in stream:
            assert event.type == "image_generation.partial_image"
            server.post("/sdapi/v1/interrupt")


def read_events(response: requests.Response):
    """Server-sent events as (event, data) pairs."""
    event, data = "message", []
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def test_native_job_with_event_stream(server):
    r = server.post("/v1/jobs", json={"prompt": "a job", "width": 64, "height": 64, "steps": 5, "seed": 3,
                                      "batch_count": 2, "sampler": "Euler"})  # fmt: skip
    assert r.status_code == 202, r.text
    created = r.json()
    assert r.headers["location"] == created["url"] and created["status"] in ("queued", "running")
    with server.session.get(created["events"], stream=True, timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(stream))
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and kinds.count("progress") >= 2 and "status" in kinds
    progress = [d for e, d in events if e == "progress"]
    assert progress[-1]["fraction"] == 1.0 and progress[-1]["batches"] == 2
    assert progress[0]["preview"].startswith("data:image/png;base64,")
    job = events[-1][1]
    assert job["status"] == "done" and [im["seed"] for im in job["result"]["images"]] == [3, 4]
    assert job["result"]["parameters"]["sampler"] == "Euler" and job["result"]["timings"]["total"] > 0
    image = Image.open(io.BytesIO(server.get(f"/v1/jobs/{job['id']}/images/1").content))
    assert "Seed: 4," in image.info["parameters"]
    assert server.get(f"/v1/jobs/{job['id']}").json()["status"] == "done"
    assert server.get(f"/v1/jobs/{job['id']}/images/2").status_code == 404


def test_native_cancel_frees_the_worker(server):
    long = server.post("/v1/jobs", json={"prompt": "long", "width": 64, "height": 64, "steps": 2000}).json()
    wait_for(lambda: (server.get(f"/v1/jobs/{long['id']}").json()["progress"] or {}).get("step", 0) >= 1,
             what="the long job to start")  # fmt: skip
    queued = server.post("/v1/jobs", json={"prompt": "queued", "width": 64, "height": 64, "steps": 2}).json()
    assert queued["queue_position"] == 1  # behind the running job
    view = server.post(f"/v1/jobs/{queued['id']}/cancel").json()
    assert view["status"] == "cancelled" and view["queue_position"] is None  # left the queue at once
    start = time.monotonic()
    server.post(f"/v1/jobs/{long['id']}/cancel")
    wait_for(lambda: server.get(f"/v1/jobs/{long['id']}").json()["status"] == "cancelled", timeout=10,
             what="the running job to stop")  # fmt: skip
    after = server.post("/v1/jobs", json={"prompt": "after", "width": 64, "height": 64, "steps": 2}).json()
    wait_for(lambda: server.get(f"/v1/jobs/{after['id']}").json()["status"] == "done", timeout=20, what="next job")
    assert time.monotonic() - start < 15  # the long job (2000 steps, ~2 min) was not run to its end
    finished = server.post(f"/v1/jobs/{after['id']}/cancel")
    assert finished.status_code == 409 and finished.json()["error"]["code"] == "job_finished"


def test_native_validation_and_capabilities(server):
    r = server.post("/v1/jobs", json={"prompt": "x", "widht": 64})
    assert r.status_code == 422 and r.json()["error"]["param"] == "widht"
    r = server.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "sampler": "Euler", "eta": 0.5})
    assert r.status_code == 422 and r.json()["error"]["param"] == "eta"
    r = server.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "init_image": "aGVsbG8=",
                                      "strength": 0.5})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["param"] == "init_image"
    r = server.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 2, "batch_count": 17})
    assert r.status_code == 422 and "limit is 16" in r.json()["error"]["message"]
    assert server.get("/v1/jobs/unknown").status_code == 404
    caps = server.get("/v1/capabilities").json()
    assert [m["id"] for m in caps["models"]] == ["tiny-a", "tiny-b"] and caps["models"][0]["current"]
    assert caps["models"][0]["defaults"] == {"width": 512, "height": 512, "steps": 20, "guidance": 7.0,
                                             "sampler": "DPM++ 2M", "schedule_type": "Automatic"}  # fmt: skip
    assert caps["limits"]["max_queue"] == 2 and caps["limits"]["max_width"] == 128
    assert "DPM++ 2M" in [s["name"] for s in caps["samplers"]] and "Karras" in caps["schedule_types"]
    assert server.get("/health").json()["status"] == "ok"
    # Errors keep each API's shape, also for routes that do not exist.
    assert set(server.get("/sdapi/v1/nope").json()) == {"error", "detail", "body", "errors"}
    assert server.get("/v1/nope").json()["error"]["type"] == "not_found_error"


def test_save_images_writes_to_the_output_dir(server):
    r = server.post("/sdapi/v1/txt2img", json={"prompt": "saved", "width": 64, "height": 64, "steps": 2,
                                               "save_images": True, "seed": 42})  # fmt: skip
    assert r.status_code == 200
    out = server.log.parent / "out"
    saved = wait_for(lambda: sorted(out.glob("*-42.png")), what="the saved PNG")
    assert "Seed: 42," in Image.open(saved[0]).info["parameters"]
