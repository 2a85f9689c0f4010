"""An SD3 model through the server: listed with its release's defaults, run by A1111's txt2img and the native job API
pixel for pixel as the library runs it (the library is checked against diffusers in tests/test_sd3_pipeline.py), and
what SD3 cannot run yet refused with the reason."""

import base64
import io

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from serving import require_serve_extra, running_server, wait_for

require_serve_extra()

PARAMS = {"prompt": "a red lighthouse", "negative_prompt": "blurry", "width": 64, "height": 48, "steps": 3, "seed": 8}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from tiny_sd3 import SD35_MEDIUM, tiny_sd3

    from mlx_sd_convert import convert

    tmp = tmp_path_factory.mktemp("sd3-server")
    from diffusers import SD3ControlNetModel
    from test_sd3_controlnet import INSTANTX

    from oracles import randomize

    tiny_sd3(tmp, transformer=SD35_MEDIUM).save_pretrained(tmp / "diffusers")
    convert(tmp / "diffusers", tmp / "models" / "sd35m", dtype="float32")
    randomize(SD3ControlNetModel(**INSTANTX), 7).save_pretrained(tmp / "controlnets" / "edges-sd3")
    with running_server(tmp / "models", tmp, "--model", "sd35m", "--max-size", "128", "--controlnet-dir",
                        str(tmp / "controlnets")) as server:  # fmt: skip
        yield server, tmp / "models" / "sd35m"


def library(folder, **kwargs):
    from mlx_sd.pipeline import Pipeline

    return Pipeline(folder).generate(**{**PARAMS, **kwargs})


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_sd3_listed_and_a1111_txt2img(sd3):
    server, folder = sd3
    models = server.get("/v1/capabilities").json()
    entry = next(m for m in models["models"] if m["id"] == "sd35m")
    assert entry["family"] == "sd3" and entry["defaults"]["steps"] == 40 and entry["defaults"]["guidance"] == 4.5
    # what a page offers for this model: every sampler with a rectified-flow variant
    assert entry["samplers"] == ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M",
                                 "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"]  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json={**PARAMS, "cfg_scale": 4.0, "sampler_name": "Euler"})
    assert r.status_code == 200, r.text
    expected = library(folder, guidance=4.0, sampler="Euler")
    np.testing.assert_array_equal(decode(r.json()["images"][0]), np.asarray(expected.images[0]))

    # A1111 clients' default sampler, with eta, runs ComfyUI's flow arithmetic (tests/test_flow_samplers.py)
    r = server.post("/sdapi/v1/txt2img", json={**PARAMS, "cfg_scale": 4.0, "sampler_name": "Euler a", "eta": 0.7})
    assert r.status_code == 200, r.text
    expected = library(folder, guidance=4.0, sampler="Euler a", eta=0.7)
    np.testing.assert_array_equal(decode(r.json()["images"][0]), np.asarray(expected.images[0]))
    refused = server.post("/sdapi/v1/txt2img", json={**PARAMS, "sampler_name": "DDIM"})
    assert refused.status_code == 422 and "rectified-flow" in refused.text, refused.text
    tiled = server.post("/sdapi/v1/txt2img", json={**PARAMS, "tiling": True})
    assert tiled.status_code == 422 and "seamless tiling" in tiled.text, tiled.text


def test_sd3_native_job(sd3):
    server, folder = sd3
    slg = {"skip_guidance_layers": [1], "skip_layer_guidance_stop": 0.7}
    r = server.post("/v1/jobs", json={**PARAMS, "sampler": "DPM++ 2M", **slg})
    assert r.status_code == 202, r.text

    def finished():
        job = server.session.get(r.json()["url"], timeout=30).json()
        return job if job["status"] not in ("queued", "running") else None

    job = wait_for(finished, timeout=120, what="the SD3 job")
    assert job["status"] == "done", job
    png = server.session.get(job["result"]["images"][0]["url"], timeout=30).content
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    expected = library(folder, sampler="DPM++ 2M", skip_guidance_layers=(1,), skip_layer_guidance_stop=0.7)
    np.testing.assert_array_equal(got, np.asarray(expected.images[0]))
    assert "SLG layers: 1" in expected.infotexts[0]
    control = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    control.save(buffer, format="PNG")
    unit = {"model": "edges-sd3", "image": base64.b64encode(buffer.getvalue()).decode(), "weight": 0.7}
    scripts = {"controlnet": {"args": [unit]}}
    r = server.post("/sdapi/v1/txt2img", json={**PARAMS, "cfg_scale": 4.0, "alwayson_scripts": scripts})
    assert r.status_code == 200, r.text
    from mlx_sd.controlnet import ControlNetUnit
    from mlx_sd_convert.controlnet import read_controlnet

    network = read_controlnet(folder.parent.parent / "controlnets" / "edges-sd3", mx.float32)
    expected = library(folder, sampler="Euler", guidance=4.0, controlnet=(ControlNetUnit(network, control, 0.7),))
    np.testing.assert_array_equal(decode(r.json()["images"][0]), np.asarray(expected.images[0]))
    wrong = server.post("/v1/jobs", json={**PARAMS, "skip_guidance_layers": [7]})
    assert wrong.status_code == 422 and "blocks 0 to 2" in wrong.text, wrong.text
