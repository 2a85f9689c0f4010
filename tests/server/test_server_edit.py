"""InstructPix2Pix models through the server: A1111's img2img with `image_cfg_scale`, and the native API's
`image_guidance`, pixel for pixel what the library makes (its edit guidance is checked against diffusers in
tests/test_edit.py); txt2img with an edit model is refused naming the field."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from serving import require_serve_extra, running_server

require_serve_extra()


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory):
    from tiny_pipelines import mlx_folder, tiny_components

    tmp = tmp_path_factory.mktemp("edit-server")
    models = tmp / "models"
    mlx_folder(tiny_components(tmp / "parts", "sd1", in_channels=8, seed=4), models / "ip2p", "sd1")
    with running_server(models, tmp, "--model", "ip2p", "--max-size", "128") as server:
        yield server, models


def _b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_image_cfg_scale_reaches_the_edit_model(edit_server):
    from mlx_sd.pipeline import Pipeline

    server, models = edit_server
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    body = {"prompt": "make it winter", "width": 64, "height": 64, "steps": 3, "seed": 6, "sampler_name": "Euler",
            "init_images": [_b64(init)], "denoising_strength": 1.0, "image_cfg_scale": 2.0}  # fmt: skip
    r = server.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    expected = Pipeline(models / "ip2p").generate(
        prompt="make it winter", width=64, height=64, steps=3, seed=6, sampler="Euler", guidance=7.0,
        init_image=init, strength=1.0, image_guidance=2.0,
    )  # fmt: skip
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    np.testing.assert_array_equal(got, np.asarray(expected.images[0]))
    assert "Image CFG scale: 2.0" in json.loads(r.json()["info"])["infotexts"][0]
    native = {"prompt": "make it winter", "width": 64, "height": 64, "steps": 3, "seed": 6, "sampler": "Euler",
              "guidance": 7.0, "init_image": _b64(init), "strength": 1.0, "image_guidance": 2.0}  # fmt: skip
    job = server.post("/v1/jobs", json=native)
    assert job.status_code == 202, job.text
    done = server.get(f"/v1/jobs/{job.json()['id']}/events", timeout=120)
    assert json.loads(done.text.strip().split("data: ")[-1])["status"] == "done"
    png = server.get(f"/v1/jobs/{job.json()['id']}/images/0").content
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), got)
    r = server.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2})
    assert r.status_code == 422 and r.json()["detail"].startswith("init_images:"), r.text
    assert "InstructPix2Pix" in r.json()["detail"]


@pytest.fixture(scope="module")
def cosxl_edit_server(tmp_path_factory):
    """CosXL Edit (an 8-channel EDM v-prediction SDXL UNet; tests/test_edit_sdxl.py checks it against diffusers)."""
    import diffusers
    from sgm_fixtures import diffusers_parts

    from mlx_sd_convert import convert
    from mlx_sd_convert.families import COSXL_SCHEDULER

    tmp = tmp_path_factory.mktemp("cosxl-edit-server")
    parts = dict(diffusers_parts("base", 9, in_channels=8))
    parts["scheduler"] = diffusers.EDMEulerScheduler(**{k: v for k, v in COSXL_SCHEDULER.items() if k[0] != "_"})
    diffusers.StableDiffusionXLInstructPix2PixPipeline(**parts, is_cosxl_edit=True).save_pretrained(tmp / "folder")
    convert(tmp / "folder", tmp / "models" / "cosxl-edit", dtype="float32")
    with running_server(tmp / "models", tmp, "--model", "cosxl-edit", "--max-size", "128") as server:
        yield server, tmp / "models"


def test_image_cfg_scale_reaches_the_sdxl_edit_model(cosxl_edit_server):
    from mlx_sd.pipeline import Pipeline

    server, models = cosxl_edit_server
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    body = {"prompt": "make it winter", "width": 64, "height": 64, "steps": 3, "seed": 6, "init_images": [_b64(init)],
            "denoising_strength": 1.0, "image_cfg_scale": 2.0, "sampler_name": "Euler",
            "scheduler": "Exponential"}  # fmt: skip
    r = server.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    expected = Pipeline(models / "cosxl-edit").generate(
        prompt="make it winter", width=64, height=64, steps=3, seed=6, init_image=init, strength=1.0,
        image_guidance=2.0,
    )  # fmt: skip
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    np.testing.assert_array_equal(got, np.asarray(expected.images[0]))
    assert "Image CFG scale: 2.0" in json.loads(r.json()["info"])["infotexts"][0]
