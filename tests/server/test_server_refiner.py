"""SDXL's refiner through the server: A1111's `refiner_checkpoint` / `refiner_switch_at` and the native API's
`refiner`, pixel for pixel what the library's `Pipeline(base, refiner=refiner)` makes (its hand-off is checked against
diffusers in tests/test_sdxl_family.py). Tiny random SDXL base and refiner models, converted from diffusers folders."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from serving import require_serve_extra, running_server, wait_for

require_serve_extra()

PARAMS = {"prompt": "a fox in the snow", "negative_prompt": "blur", "width": 64, "height": 64, "steps": 6, "seed": 21}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from sgm_fixtures import write_diffusers_folder

    from mlx_sd_convert import convert

    tmp = tmp_path_factory.mktemp("refiner")
    models = tmp / "models"
    for kind in ("base", "refiner"):
        convert(write_diffusers_folder(tmp / f"{kind}-diffusers", kind), models / f"xl-{kind}", dtype="float32")
    with running_server(models, tmp, "--model", "xl-base", "--max-size", "128") as server:
        yield server, models


def library(models, **kwargs):
    from mlx_sd.pipeline import Pipeline

    refiner = kwargs.pop("refiner", None)
    pipe = Pipeline(models / "xl-base", refiner=None if refiner is None else models / refiner)
    return pipe.generate(**PARAMS, guidance=5.0, sampler="Euler", **kwargs)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_a1111_refiner_checkpoint(sdxl):
    server, models = sdxl
    request = {**PARAMS, "cfg_scale": 5.0, "sampler_name": "Euler", "refiner_checkpoint": "xl-refiner",
               "refiner_switch_at": 0.6}  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json=request)
    assert r.status_code == 200, r.text
    expected = library(models, refiner="xl-refiner", refiner_switch_at=0.6)
    np.testing.assert_array_equal(decode(r.json()["images"][0]), np.asarray(expected.images[0]))
    infotext = json.loads(r.json()["info"])["infotexts"][0]
    assert infotext == expected.infotexts[0] and "Refiner switch at: 0.6" in infotext

    # "None" (A1111's menu entry) and no refiner: the base alone, the refiner detached again.
    alone = server.post("/sdapi/v1/txt2img", json={**request, "refiner_checkpoint": "None"})
    np.testing.assert_array_equal(decode(alone.json()["images"][0]), np.asarray(library(models).images[0]))

    # Refused with a reason: an unknown refiner, a switch point outside (0, 1].
    missing = server.post("/sdapi/v1/txt2img", json={**request, "refiner_checkpoint": "nope"})
    assert missing.status_code == 404 and "refiner_checkpoint" in missing.text
    bad = server.post("/sdapi/v1/txt2img", json={**request, "refiner_switch_at": 1.5})
    assert bad.status_code == 422 and "refiner_switch_at" in bad.text


def test_native_job_with_refiner(sdxl):
    server, models = sdxl
    r = server.post("/v1/jobs", json={**PARAMS, "guidance": 5.0, "sampler": "Euler", "refiner": "xl-refiner"})
    assert r.status_code == 202, r.text

    def finished():
        job = server.session.get(r.json()["url"], timeout=30).json()
        return job if job["status"] not in ("queued", "running") else None

    job = wait_for(finished, timeout=120, what="the refined job")
    assert job["status"] == "done" and job["refiner"] == "xl-refiner", job
    png = server.session.get(job["result"]["images"][0]["url"], timeout=30).content
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(got, np.asarray(library(models, refiner="xl-refiner").images[0]))  # switch at 0.8

    no_refiner = server.post("/v1/jobs", json={**PARAMS, "refiner_switch_at": 0.5})
    assert no_refiner.status_code == 422 and "needs a refiner" in no_refiner.text
