"""Model upscalers through the server: A1111's Extras endpoints (through webuiapi, as clients call them), its
upscaler listing, and the hires fix naming a model of --upscaler-dir; against A1111's own upscaling, transcribed in
tests/a1111_upscale.py with spandrel's networks."""

import base64
import io
import json

import mlx.core as mx
import numpy as np
import pytest
from a1111_upscale import extras_upscale, load_descriptor, upscale, upscale_with_model
from PIL import Image, PngImagePlugin
from serving import require_serve_extra, running_server, wait_for
from test_model_upscaler import FILES, _close_images, _save
from test_server_page import CHROMEDRIVER, CHROMIUM, By, WebDriverWait, fill
from test_server_page import browser as browser  # noqa: F401  (the headless Chromium fixture)

from mlx_sd.pipeline import Pipeline
from mlx_sd_convert.library import UpscalerLibrary

require_serve_extra()
webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture(scope="module")
def served(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upscaler-server")
    folder = tmp / "upscalers"
    (folder / "RealESRGAN").mkdir(parents=True)
    states = {"4x-Tiny": FILES["ESRGAN_4x.pth"](), "R-ESRGAN 4x+": FILES["RealESRGAN_x4plus.pth"]()}
    _save(folder, "4x-Tiny.pth", states["4x-Tiny"])
    _save(folder / "RealESRGAN", "RealESRGAN_x4plus.pth", states["R-ESRGAN 4x+"])
    with running_server(models_dir, tmp, "--model", "tiny-a", "--upscaler-dir", str(folder)) as server:
        server.api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        server.networks = {name: load_descriptor(state) for name, state in states.items()}
        server.folder = folder
        yield server


def picture(seed: int, size=(48, 40)) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(values)


def _model(served, name):
    return lambda im: upscale_with_model(served.networks[name], im, 192, 8)


def test_upscalers_are_listed_as_a1111_lists_them(served):
    listing = served.api.get_upscalers()
    assert [u["name"] for u in listing] == ["None", "Lanczos", "Nearest", "4x-Tiny", "R-ESRGAN 4x+"]
    assert listing[4]["scale"] == 4 and listing[4]["model_path"].endswith("RealESRGAN_x4plus.pth")
    caps = served.get("/v1/capabilities").json()
    assert caps["upscalers"][-2:] == ["4x-Tiny", "R-ESRGAN 4x+"] and caps["latent_upscalers"][0] == "Latent"


def test_extra_single_image_matches_a1111_and_keeps_the_parameters(served):
    image = picture(1)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a photo\nSteps: 20, Seed: 1")
    raw = io.BytesIO()
    image.save(raw, "PNG", pnginfo=meta)
    r = served.post("/sdapi/v1/extra-single-image", json={
        "image": base64.b64encode(raw.getvalue()).decode(), "upscaler_1": "4x-Tiny", "upscaling_resize": 2.5,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
    _close_images(got, upscale(image, 2.5, _model(served, "4x-Tiny")))
    assert got.info["parameters"] == "a photo\nSteps: 20, Seed: 1"
    assert got.info["postprocessing"] == "Postprocess upscale by: 2.5, Postprocess upscaler: 4x-Tiny"
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 2.5, Postprocess upscaler: 4x-Tiny</p>"


def test_extra_batch_images_scale_to_with_a_second_upscaler(served):
    images = [picture(2), picture(3, (40, 48))]
    result = served.api.extra_batch_images(
        images, resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=88, upscaling_crop=True,
        upscaler_1="R-ESRGAN 4x+", upscaler_2="Lanczos", extras_upscaler_2_visibility=0.4,
    )  # fmt: skip
    assert len(result.images) == 2
    for image, got in zip(images, result.images):
        factor = max(100 / image.width, 88 / image.height)
        lanczos = lambda im, f=factor: im.resize((int(im.width * f), int(im.height * f)), Image.LANCZOS)  # noqa: E731
        expected, _ = extras_upscale(image, _model(served, "R-ESRGAN 4x+"), lanczos, mode=1, to_width=100,
                                     to_height=88, crop=True, visibility=0.4)  # fmt: skip
        _close_images(got, expected)


def test_hires_fix_with_a_model_of_the_upscaler_folder(served, models_dir):
    body = {"prompt": "hires", "width": 64, "height": 48, "steps": 2, "seed": 4, "sampler_name": "Euler a",
            "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "R-ESRGAN 4x+", "hr_second_pass_steps": 1,
            "denoising_strength": 0.5}  # fmt: skip
    r = served.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    library = UpscalerLibrary(served.folder, mx.float32)
    expected = Pipeline(models_dir / "tiny-a", upscaler_resolver=library).generate(
        prompt="hires", width=64, height=48, steps=2, seed=4, enable_hr=True, hr_scale=1.5,
        hr_upscaler="R-ESRGAN 4x+", hr_second_pass_steps=1, strength=0.5, sampler="Euler a", guidance=7.0,
    )  # fmt: skip
    assert got.size == (96, 72)
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(expected.images[0]))
    r = served.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "4x-Missing"})
    assert r.status_code == 422 and "hr_upscaler" in r.text and "4x-Tiny" in r.text  # names what there is
    r = served.post("/v1/jobs", json={"prompt": "x", "enable_hr": True, "hr_upscaler": "SwinIR 4x"})
    assert r.status_code == 422 and "not found" in r.text


def test_sd_upscale_script_through_img2img(served, models_dir):
    """A1111's "SD upscale" img2img script (script_args: info, overlap, upscaler index or name, scale) equals the
    library's (itself tested against diffusers, tests/test_sd_upscale.py)."""
    from mlx_sd.params import GenerationRequest
    from mlx_sd.sd_upscale import SDUpscale, stream

    init = picture(6, (48, 40))
    image = io.BytesIO()
    init.save(image, "PNG")
    # script_args: A1111's info text, tile overlap, upscaler (3: "4x-Tiny" in GET /upscalers), scale factor
    body = {"prompt": "tiles", "width": 64, "height": 64, "steps": 3, "seed": 9, "sampler_name": "Euler",
            "denoising_strength": 0.4, "init_images": [base64.b64encode(image.getvalue()).decode()],
            "script_name": "SD upscale", "script_args": [None, 16, 3, 2.0]}  # fmt: skip
    r = served.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    library = UpscalerLibrary(served.folder, mx.float32)
    request = GenerationRequest(prompt="tiles", width=64, height=64, steps=3, seed=9, sampler="Euler", guidance=7.0,
                                strength=0.4, init_image=init)  # fmt: skip
    events = stream(Pipeline(models_dir / "tiny-a"), request, SDUpscale(library("4x-Tiny"), 2.0, 16))
    expected = list(events)[-1]
    assert got.size == (96, 80)
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(expected.images[0]))
    assert "SD upscale upscaler: 4x-Tiny" in json.loads(r.json()["info"])["infotexts"][0]
    for args, param in (([None, 16, "nope", 2.0], "script_args[2]"), ([None, 64, 0, 2.0], "script_args"),
                        ([None, 16, 0, 0], "script_args[3]")):  # fmt: skip
        r = served.post("/sdapi/v1/img2img", json={**body, "script_args": args})
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{param}:"), r.text
    r = served.post("/sdapi/v1/txt2img", json={"prompt": "x", "script_name": "SD upscale"})
    assert r.status_code == 422 and "img2img" in r.json()["detail"]

    # the native API: the same script as an `sd_upscale` object, the upscaler by name
    native = {"prompt": "tiles", "width": 64, "height": 64, "steps": 3, "seed": 9, "sampler": "Euler",
              "guidance": 7.0, "strength": 0.4, "init_image": body["init_images"][0],
              "sd_upscale": {"upscaler": "4x-Tiny", "scale": 2.0, "overlap": 16}}  # fmt: skip
    r = served.post("/v1/jobs", json=native)
    assert r.status_code == 202, r.text

    def finished():
        job = served.session.get(r.json()["url"], timeout=30).json()
        return job if job["status"] not in ("queued", "running") else None

    job = wait_for(finished, timeout=120, what="the SD upscale job")
    assert job["status"] == "done", job
    png = served.session.get(job["result"]["images"][0]["url"], timeout=30).content
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(got.convert("RGB"))
    )
    for script, param in (({"upscaler": "4x-Nope"}, "sd_upscale.upscaler"), ({"overlap": 64}, "sd_upscale")):
        r = served.post("/v1/jobs", json={**native, "sd_upscale": script})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text


def test_extras_refusals(served):
    image = io.BytesIO()
    picture(5).save(image, "PNG")
    data = base64.b64encode(image.getvalue()).decode()
    cases = [
        ({"upscaler_1": "4x-Tiny", "gfpgan_visibility": 0.5}, "gfpgan_visibility", "face restoration"),
        ({"upscaler_1": "SwinIR 4x"}, "upscaler_1", "not found"),
        ({"upscaler_1": "Lanczos", "upscaler_2": "Latent"}, "upscaler_2", "not found"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 8, "resize_mode": 1, "upscaling_resize_w": 9000}, None, ""),
        ({"upscaler_1": "4x-Tiny", "image": "not base64"}, "image", "base64"),
    ]
    for fields, param, message in cases:
        r = served.post("/sdapi/v1/extra-single-image", json={"image": data, **fields})
        assert r.status_code == 422, (fields, r.text)
        if param:
            assert r.json()["detail"].startswith(f"{param}:") and message in r.json()["detail"], r.text
    r = served.post("/sdapi/v1/extra-batch-images", json={"imageList": []})
    assert r.status_code == 422 and "imageList" in r.text


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver")
def test_page_runs_the_hires_fix_with_a_model_upscaler(browser, served):
    browser.get(served.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#hr-upscaler option"))
    browser.find_element(By.CSS_SELECTOR, "#hires-box summary").click()
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#hr-upscaler option")]
    assert options[0] == "Latent" and options[-2:] == ["4x-Tiny", "R-ESRGAN 4x+"]
    fill(browser, prompt="a lighthouse", width=64, height=64, steps=2, seed=3, hr_scale=1.5, hr_steps=1)
    browser.find_element(By.ID, "enable-hr").click()
    browser.find_element(By.CSS_SELECTOR, "#hr-upscaler option[value='R-ESRGAN 4x+']").click()
    browser.find_element(By.ID, "generate").click()
    card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))[0]
    text = card.find_element(By.TAG_NAME, "pre").text
    assert "Hires upscaler: R-ESRGAN 4x+" in text and "Hires upscale: 1.5" in text and "Size: 64x64" in text
