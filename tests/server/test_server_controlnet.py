"""ControlNet through the server: A1111's ControlNet extension API (webuiapi's ControlNetUnit, the extension's routes)
and the native API, against the library's own generation with the same units."""

import base64
import io
import json

import mlx.core as mx
import numpy as np
import pytest
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from serving import require_serve_extra, running_server
from test_controlnet import tiny_controlnet
from test_ip_adapter import tiny_encoder, tiny_ip_state
from test_server_page import CHROMEDRIVER, CHROMIUM, By, WebDriverWait, fill
from test_server_page import browser as browser  # noqa: F401  (the headless Chromium fixture)
from test_t2i_adapter import tiny_adapter
from tiny_pipelines import UNETS

from mlx_sd.controlnet import ControlNetUnit
from mlx_sd.pipeline import Pipeline
from mlx_sd_convert.controlnet import a1111_hash, read_controlnet
from mlx_sd_convert.ip_adapter import read_ip_adapter

require_serve_extra()
webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture(scope="module")
def served(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controlnet-server")
    folder = tmp / "controlnets"
    tiny_controlnet("sd1", 11).save_pretrained(folder / "edges")
    tiny_controlnet("sd1", 12).save_pretrained(folder / "lines")
    tiny_adapter("full_adapter").save_pretrained(folder / "t2i_sketch")
    tiny_encoder(tmp / "image_encoder")
    state = tiny_ip_state(UNet2DConditionModel(**UNETS["sd1"]))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "ip-adapter_tiny.safetensors")
    ip = ("--ip-adapter", str(tmp / "ip-adapter_tiny.safetensors"), "--image-encoder", str(tmp / "image_encoder"))
    with running_server(models_dir, tmp, "--model", "tiny-a", "--controlnet-dir", str(folder), *ip) as server:
        server.ip = (tmp / "ip-adapter_tiny.safetensors", tmp / "image_encoder")
        yield server, folder


def photo(seed: int, size=(64, 64)) -> Image.Image:
    rough = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(rough).resize(size, Image.NEAREST)


def b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def decoded(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def test_extension_routes(served):
    server, folder = served
    ip = f"ip-adapter_tiny [{a1111_hash(server.ip[0])}]"
    assert server.get("/controlnet/model_list").json() == {"model_list": ["edges", "lines", "t2i_sketch", ip]}
    modules = server.get("/controlnet/module_list").json()["module_list"]
    assert modules[:3] == ["none", "invert", "canny"] and "tile_resample" in modules
    assert server.get("/controlnet/version").json() == {"version": 2}
    assert server.get("/sdapi/v1/scripts").json()["txt2img"] == ["controlnet"]
    body = {"controlnet_module": "canny", "controlnet_input_images": [b64(photo(1, (128, 64)))],
            "controlnet_processor_res": 64}  # fmt: skip
    detected = server.post("/controlnet/detect", json=body)
    assert detected.status_code == 200, detected.text
    edges = decoded(detected.json()["images"][0])
    assert edges.shape == (64, 128, 3) and set(np.unique(edges)) == {0, 255}
    bad = server.post("/controlnet/detect", json={"controlnet_module": "openpose", "controlnet_input_images": []})
    assert bad.status_code == 422 and "controlnet_module" in bad.text


def test_webuiapi_units_generate_as_the_library_does(served, models_dir):
    server, folder = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    lines = "lines"
    units = [
        webuiapi.ControlNetUnit(image=photo(2), model="edges", weight=0.8, resize_mode="Just Resize",
                                control_mode=1, guidance_end=0.75),
        webuiapi.ControlNetUnit(image=photo(3), module="invert", model=lines, weight=1.2, resize_mode="Crop and Resize",
                                control_mode=2),
    ]  # fmt: skip
    # a dict of our own: webuiapi adds the units to `alwayson_scripts`, by default a dict shared by every later call
    result = api.txt2img(prompt="a house", width=64, height=64, steps=4, seed=5, sampler_name="Euler",
                         controlnet_units=units, alwayson_scripts={})  # fmt: skip
    params = result.info["extra_generation_params"]
    assert "Model: edges, Weight: 0.8" in params["ControlNet 0"]
    assert f"Module: invert, Model: {lines}" in params["ControlNet 1"]
    assert "Control Mode: ControlNet is more important" in params["ControlNet 1"]

    library = [read_controlnet(folder / "edges", mx.float32), read_controlnet(folder / "lines", mx.float32)]
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="a house", width=64, height=64, steps=4, seed=5, sampler="Euler", guidance=7.0, controlnet=(
            ControlNetUnit(library[0], photo(2), 0.8, guidance_end=0.75, control_mode="prompt", resize_mode="resize"),
            ControlNetUnit(library[1], photo(3), 1.2, control_mode="controlnet", module="invert"),
        ),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), np.asarray(expected.images[0]))
    plain = server.post("/sdapi/v1/txt2img", json={"prompt": "a house", "width": 64, "height": 64, "steps": 4,
                                                   "seed": 5, "sampler_name": "Euler"})  # fmt: skip
    assert not np.array_equal(decoded(plain.json()["images"][0]), np.asarray(result.image.convert("RGB")))


def test_img2img_unit_without_image_uses_the_init_image_and_native_jobs(served, models_dir):
    server, folder = served
    init = photo(4)
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 3, "seed": 9, "init_images": [b64(init)],
            "denoising_strength": 0.8, "sampler_name": "Euler"}  # fmt: skip
    with_image = server.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
        {"model": "edges", "image": b64(init)}]}}})  # fmt: skip
    without = server.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
        {"model": "edges"}, {"model": "None"}, {"model": "edges", "enabled": False}]}}})  # fmt: skip
    assert with_image.status_code == 200 and without.status_code == 200, without.text
    assert with_image.json()["images"] == without.json()["images"]

    # an inpainting ControlNet's module reads the request's init image and mask (A1111's name for it)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (8, 8, 40, 48))
    unit = {"model": "edges", "module": "inpaint_global_harmonious"}
    inpaint = {**body, "mask": b64(mask), "mask_blur": 0, "inpaint_full_res": False, "inpainting_fill": 1,
               "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
    r = server.post("/sdapi/v1/img2img", json=inpaint)
    assert r.status_code == 200, r.text
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="x", width=64, height=64, steps=3, seed=9, init_image=init, strength=0.8, sampler="Euler",
        guidance=7.0, mask=mask, paste_back=True,
        controlnet=(ControlNetUnit(read_controlnet(folder / "edges", mx.float32), module="inpaint"),),
    )  # fmt: skip
    assert np.array_equal(decoded(r.json()["images"][0]), np.asarray(expected.images[0]))
    assert "Module: inpaint_global_harmonious" in json.loads(r.json()["info"])["infotexts"][0]

    job = server.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 3, "seed": 9,
                                        "init_image": b64(init), "strength": 0.8, "sampler": "Euler",
                                        "controlnet": [{"model": "edges", "image": b64(init)}]})  # fmt: skip
    assert job.status_code == 202, job.text
    done = server.get(f"/v1/jobs/{job.json()['id']}/events", timeout=120)
    final = json.loads(done.text.strip().split("data: ")[-1])
    assert final["status"] == "done", final
    png = server.get(f"/v1/jobs/{job.json()['id']}/images/0").content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")),
                          decoded(with_image.json()["images"][0]))  # fmt: skip


def test_errors_name_the_field(served, server):
    served_server, _ = served
    base = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    unit = {"model": "edges", "image": b64(photo(5))}
    cases = [
        ({"model": "sketch"}, "args[0].model", "not found"),
        ({"module": "depth_midas"}, "args[0].module", "not one of"),
        ({"hr_option": "Sometimes"}, "args[0].hr_option", "'Low res only'"),
        ({"mask": b64(photo(6))}, "args[0].mask", "not supported"),
        ({"guidance_start": 0.9, "guidance_end": 0.2}, "args[0]", "start < end"),
        ({"image": ""}, "args[0].image", "required"),
        ({"module": ["canny"]}, "args[0].module", "not one of"),
        ({"module": "canny", "processor_res": 100000}, "args[0]", "processor_res"),
    ]
    for change, where, message in cases:
        body = {**base, "alwayson_scripts": {"controlnet": {"args": [{**unit, **change}]}}}
        r = served_server.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith(f"alwayson_scripts.controlnet.{where}"), r.text
        assert message in r.json()["detail"]
    r = served_server.post("/v1/jobs", json={**base, "controlnet": [{**unit, "model": "sketch"}]})
    assert r.status_code == 422 and "controlnet[0].model" in r.text
    # a server without --controlnet-dir says how to get one
    r = server.post("/sdapi/v1/txt2img", json={**base, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 422 and "--controlnet-dir" in r.json()["detail"]


def test_hr_option_reaches_the_unit(served):
    """The extension's hr_option by name, index or enum name: a "High res only" unit is idle without a hires fix, on
    both APIs; the infotext records the option as the extension parses it."""
    server, _ = served
    base = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 3, "sampler_name": "Euler"}
    plain = server.post("/sdapi/v1/txt2img", json=base).json()["images"][0]
    for option in ("High res only", 2, "HiResFixOption.HIGH_RES_ONLY"):
        unit = {"model": "edges", "image": b64(photo(5)), "hr_option": option}
        r = server.post("/sdapi/v1/txt2img", json={**base, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert r.status_code == 200, r.text
        assert np.array_equal(decoded(r.json()["images"][0]), decoded(plain)), option
        assert "Hr Option: High res only" in json.loads(r.json()["info"])["infotexts"][0]
    native = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 3, "sampler": "Euler",
              "controlnet": [{"model": "edges", "image": b64(photo(5)), "hr_option": "high_res_only"}]}  # fmt: skip
    job = server.post("/v1/jobs", json=native)
    assert job.status_code == 202, job.text
    final = json.loads(server.get(f"/v1/jobs/{job.json()['id']}/events", timeout=120).text.strip().split("data: ")[-1])
    assert final["status"] == "done", final
    png = server.get(f"/v1/jobs/{job.json()['id']}/images/0").content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), decoded(plain))


def test_reference_unit_generates_as_the_library_does(served, models_dir):
    """A reference_only unit (model "None", as the extension sends it) through A1111's API, and through the native
    API without a model: the library's image with the same unit (the reference noise from the seed)."""
    server, _ = served
    base = {"prompt": "x", "width": 64, "height": 64, "steps": 3, "seed": 4, "sampler_name": "Euler"}
    unit = {"model": "None", "module": "reference_only", "image": b64(photo(6)), "weight": 0.8, "threshold_a": 0.4}
    r = server.post("/sdapi/v1/txt2img", json={**base, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    assert "Module: reference_only, Model: None, Weight: 0.8" in json.loads(r.json()["info"])["infotexts"][0]
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="x", width=64, height=64, steps=3, seed=4, sampler="Euler", guidance=7.0,
        controlnet=(ControlNetUnit(None, photo(6), 0.8, module="reference_only", threshold_a=0.4),),
    )  # fmt: skip
    np.testing.assert_array_equal(decoded(r.json()["images"][0]), np.asarray(expected.images[0]))
    native = {
        "prompt": "x",
        "width": 64,
        "height": 64,
        "steps": 3,
        "seed": 4,
        "sampler": "Euler",
        "controlnet": [{"module": "reference_only", "image": b64(photo(6)), "weight": 0.8, "threshold_a": 0.4}],
    }
    job = server.post("/v1/jobs", json=native)
    assert job.status_code == 202, job.text
    server.get(f"/v1/jobs/{job.json()['id']}/events", timeout=120)
    png = server.get(f"/v1/jobs/{job.json()['id']}/images/0").content
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(expected.images[0])
    )
    bad = server.post("/v1/jobs", json={**native, "controlnet": [{"module": "canny", "image": b64(photo(6))}]})
    assert bad.status_code == 422 and "needs a ControlNet" in bad.text


def test_t2i_adapter_unit_generates_as_the_library_does(served, models_dir):
    server, folder = served
    unit = {"model": "t2i_sketch", "image": b64(photo(13)), "weight": 0.8, "control_mode": 1}  # soft injection
    body = {"prompt": "a house", "width": 64, "height": 64, "steps": 3, "seed": 4, "sampler_name": "Euler",
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    adapter = read_controlnet(folder / "t2i_sketch", mx.float32)
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="a house", width=64, height=64, steps=3, seed=4, sampler="Euler", guidance=7.0,
        controlnet=(ControlNetUnit(adapter, photo(13), 0.8, control_mode="prompt"),),
    )  # fmt: skip
    np.testing.assert_array_equal(decoded(r.json()["images"][0]), np.asarray(expected.images[0]))


def test_ip_adapter_units_and_native_image_prompts(served, models_dir):
    server, folder = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    prompt_image = photo(11, (48, 40))
    units = [webuiapi.ControlNetUnit(image=prompt_image, module="ip-adapter_clip_sd15", model="ip-adapter_tiny",
                                     weight=0.6)]  # fmt: skip
    result = api.txt2img(prompt="a house", width=64, height=64, steps=3, seed=8, sampler_name="Euler",
                         controlnet_units=units, alwayson_scripts={})  # fmt: skip
    assert "IP-Adapter weight: 0.6" in result.info["infotexts"][0]
    assert result.info["extra_generation_params"]["IP-Adapter weight"] == "0.6"
    adapter = read_ip_adapter(*server.ip, mx.float32)
    expected = Pipeline(models_dir / "tiny-a", ip_adapter=adapter).generate(
        prompt="a house", width=64, height=64, steps=3, seed=8, sampler="Euler", guidance=7.0,
        ip_adapter_image=prompt_image, ip_adapter_scale=0.6,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), np.asarray(expected.images[0]))

    job = server.post("/v1/jobs", json={"prompt": "a house", "width": 64, "height": 64, "steps": 3, "seed": 8,
                                        "sampler": "Euler", "guidance": 7.0, "ip_adapter_image": b64(prompt_image),
                                        "ip_adapter_scale": 0.6})  # fmt: skip
    assert job.status_code == 202, job.text
    server.get(f"/v1/jobs/{job.json()['id']}/events", timeout=120)
    png = server.get(f"/v1/jobs/{job.json()['id']}/images/0").content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(expected.images[0]))

    base = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    unit = {"module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny", "image": b64(prompt_image)}
    for change, where in [({"model": "ip-adapter_sd15"}, "model"), ({"guidance_end": 0.5}, "guidance_end"),
                          ({"module": "ip-adapter_face_id"}, "module")]:  # fmt: skip
        body = {**base, "alwayson_scripts": {"controlnet": {"args": [{**unit, **change}]}}}
        r = server.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith(f"alwayson_scripts.controlnet.args[0].{where}")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver")
def test_page_sends_a_controlnet_unit(browser, served, tmp_path):
    server, _ = served
    photo(8).save(tmp_path / "edges.png")
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#controlnet option"))
    browser.find_element(By.CSS_SELECTOR, "#controlnet-box summary").click()
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#controlnet option")]
    assert options == ["none", "edges", "lines", "t2i_sketch"]
    fill(browser, prompt="a lighthouse", width=64, height=64, steps=3, seed=2, control_weight=0.7)
    browser.find_element(By.CSS_SELECTOR, "#controlnet option[value='edges']").click()
    browser.find_element(By.ID, "control-image").send_keys(str(tmp_path / "edges.png"))
    browser.find_element(By.CSS_SELECTOR, "#ip-adapter-box summary").click()
    browser.find_element(By.ID, "ip-adapter-image").send_keys(str(tmp_path / "edges.png"))
    fill(browser, ip_adapter_scale=0.4)
    browser.find_element(By.ID, "generate").click()
    card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))[0]
    text = card.find_element(By.TAG_NAME, "pre").text
    assert 'ControlNet 0: "Module: none, Model: edges, Weight: 0.7' in text and "IP-Adapter weight: 0.4" in text


def test_page_sends_a_reference_unit(browser, served, tmp_path):
    """A reference module needs no ControlNet: the page sends the unit without a model."""
    server, _ = served
    photo(9).save(tmp_path / "style.png")
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#control-module option"))
    browser.find_element(By.CSS_SELECTOR, "#controlnet-box summary").click()
    fill(browser, prompt="a lighthouse", width=64, height=64, steps=2, seed=2, control_weight=0.8)
    browser.find_element(By.CSS_SELECTOR, "#control-module option[value='reference_only']").click()
    browser.find_element(By.ID, "control-image").send_keys(str(tmp_path / "style.png"))
    browser.find_element(By.ID, "generate").click()
    card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .card"))[0]
    assert (
        'ControlNet 0: "Module: reference_only, Model: None, Weight: 0.8' in card.find_element(By.TAG_NAME, "pre").text
    )
