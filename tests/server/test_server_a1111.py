"""The A1111 API (`/sdapi/v1`) driven by the `webuiapi` client library, unmodified, against a listening server."""

import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image
from serving import require_serve_extra, wait_for

require_serve_extra()

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_txt2img_as_the_library_generates_it_and_png_info_round_trips(api, models_dir):
    result = api.txt2img(prompt="a red fox, (snow:1.2)", negative_prompt="blurry", width=64, height=64, steps=3,
                         seed=1234, batch_size=2, cfg_scale=5, sampler_name="Euler a", scheduler="Karras")  # fmt: skip
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    info = result.info
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234
    assert info["sampler_name"] == "Euler a" and info["steps"] == 3 and info["cfg_scale"] == 5
    assert info["sd_model_hash"] == "a1a1a1a1a1" and info["extra_generation_params"] == {"Schedule type": "Karras"}
    for image, text in zip(result.images, info["infotexts"]):
        assert image.info["parameters"] == text  # the infotext travels in the PNG, as A1111 writes it

    # The server passes A1111's fields through faithfully: the same generation through the library, pixel for pixel.
    from mlx_sd.pipeline import Pipeline

    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="a red fox, (snow:1.2)", negative_prompt="blurry", width=64, height=64, steps=3, seed=1234,
        batch_size=2, guidance=5.0, sampler="Euler a", schedule_type="Karras",
    )  # fmt: skip
    for got, want in zip(result.images, expected.images):
        np.testing.assert_array_equal(pixels(got), pixels(want))
    assert info["infotexts"] == expected.infotexts

    parsed = api.png_info(result.images[1]).json
    assert parsed["info"] == info["infotexts"][1]
    params = parsed["parameters"]
    assert params["Prompt"] == "a red fox, (snow:1.2)" and params["Negative prompt"] == "blurry"
    assert (params["Seed"], params["Steps"], params["Sampler"], params["Schedule type"]) == ("1235", "3", "Euler a",
                                                                                           "Karras")  # fmt: skip
    assert (params["Size-1"], params["Size-2"], params["CFG scale"]) == ("64", "64", "5.0")


def test_a1111_seed_convention_image_i_uses_seed_plus_i(api):
    batch = api.txt2img(prompt="seeds", width=64, height=64, steps=2, seed=77, batch_size=1, n_iter=2)
    second = api.txt2img(prompt="seeds", width=64, height=64, steps=2, seed=78)
    assert batch.info["all_seeds"] == [77, 78]
    np.testing.assert_array_equal(pixels(batch.images[1]), pixels(second.image))
    random = api.txt2img(prompt="seeds", width=64, height=64, steps=2, seed=-1)
    assert 0 <= random.info["seed"] < 2**32 and f"Seed: {random.info['seed']}," in random.info["infotexts"][0]


def test_img2img_and_inpainting(api):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    result = api.img2img(images=[init], prompt="repaint", width=64, height=64, steps=4, denoising_strength=0.5,
                         seed=3)  # fmt: skip
    assert result.image.size == (64, 64)
    assert "Denoising strength: 0.5" in result.info["infotexts"][0] and result.info["denoising_strength"] == 0.5

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for fill in (0, 1, 2, 3):  # "fill", "original", "latent noise", "latent nothing" masked content
        painted = api.img2img(images=[init], mask_image=mask, prompt="a hat", width=64, height=64, steps=4,
                              denoising_strength=1.0, seed=5, mask_blur=0, inpainting_fill=fill,
                              inpaint_full_res=False)  # fmt: skip
        out, original = pixels(painted.image), pixels(init)
        outside = np.asarray(mask) == 0
        np.testing.assert_array_equal(out[outside], original[outside])  # pasted back outside the mask
        assert np.abs(out[~outside] - original[~outside]).mean() > 10  # repainted inside

    with pytest.raises(RuntimeError, match="422"):  # webuiapi's way of reporting an error status
        api.img2img(images=[init], mask_image=mask, prompt="x", width=64, height=64, steps=2, resize_mode=3)


def test_img2img_fields_map_onto_the_library(server, models_dir):
    """resize_mode, inpainting_mask_invert, mask_blur, "only masked" with its padding, denoising_strength: the
    server's image equals the library's for the same settings, pixel for pixel."""
    from mlx_sd.pipeline import Pipeline

    rng = np.random.default_rng(4)
    init = Image.fromarray(rng.integers(0, 256, (96, 64, 3), dtype=np.uint8))  # 64 wide, 96 high: resized
    mask = Image.new("L", (64, 96), 255)
    mask.paste(0, (8, 8, 40, 40))  # inverted below: repaint the black square
    body = {"prompt": "mapped", "init_images": [_b64_png(init)], "mask": _b64_png(mask), "width": 64, "height": 64,
            "steps": 4, "seed": 21, "denoising_strength": 0.75, "resize_mode": 1, "inpainting_mask_invert": 1,
            "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res": True, "inpaint_full_res_padding": 8,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras"}  # fmt: skip
    r = server.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="mapped", init_image=init, mask=mask, width=64, height=64, steps=4, seed=21, strength=0.75,
        resize_mode="crop", invert_mask=True, mask_blur=2.0, inpaint_full_res=True, inpaint_padding=8,
        paste_back=True, guidance=7.0, sampler="DPM++ 2M", schedule_type="Karras",
    )  # fmt: skip
    assert got.size == expected.images[0].size == (64, 96)  # "only masked" pastes back into the original
    np.testing.assert_array_equal(pixels(got), pixels(expected.images[0]))
    assert json.loads(r.json()["info"])["infotexts"] == expected.infotexts


def test_hires_fields_map_onto_the_library(server, models_dir):
    """enable_hr with A1111's hires fields (its UI's "Use same ..." values included): the server's image equals the
    library's, pixel for pixel, at the hires size; sizes above the server's limit are refused by name."""
    from mlx_sd.pipeline import Pipeline

    body = {"prompt": "hires", "width": 64, "height": 48, "steps": 3, "seed": 8, "sampler_name": "Euler a",
            "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (nearest)", "hr_second_pass_steps": 2,
            "denoising_strength": 0.5, "hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler",
            "hr_checkpoint_name": "Use same checkpoint", "hr_negative_prompt": "blurry"}  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="hires", width=64, height=48, steps=3, seed=8, sampler="Euler a", guidance=7.0, enable_hr=True,
        hr_scale=1.5, hr_upscaler="Latent (nearest)", hr_second_pass_steps=2, strength=0.5,
        hr_negative_prompt="blurry",
    )  # fmt: skip
    assert got.size == expected.images[0].size == (96, 72)
    np.testing.assert_array_equal(pixels(got), pixels(expected.images[0]))
    info = json.loads(r.json()["info"])
    assert info["infotexts"] == expected.infotexts and info["denoising_strength"] == 0.5
    assert info["extra_generation_params"]["Hires upscaler"] == "Latent (nearest)"
    r = server.post("/sdapi/v1/txt2img", json={**body, "hr_scale": 3})
    assert r.status_code == 422 and r.json()["detail"].startswith("hr_scale:") and "limit" in r.text
    r = server.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "4x-UltraSharp"})
    assert r.status_code == 422 and "model upscalers" in r.text


def test_variation_seed_fields_map_onto_the_library(server, models_dir):
    """subseed, subseed_strength and seed resize (A1111's "Extra"), and tiling: the library's image;
    seed_enable_extras=false ignores the seed extras, as A1111 does."""
    from mlx_sd.pipeline import Pipeline

    body = {"prompt": "varied", "width": 64, "height": 64, "steps": 2, "seed": 12, "subseed": 77, "batch_size": 2,
            "subseed_strength": 0.3, "seed_resize_from_w": 48, "seed_resize_from_h": 80}  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    got = [Image.open(io.BytesIO(base64.b64decode(b))) for b in r.json()["images"]]
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="varied", width=64, height=64, steps=2, seed=12, subseed=77, subseed_strength=0.3, batch_size=2,
        seed_resize_from_w=48, seed_resize_from_h=80, sampler="Euler", guidance=7.0,
    )  # fmt: skip
    for a, b in zip(got, expected.images):
        np.testing.assert_array_equal(pixels(a), pixels(b))
    info = json.loads(r.json()["info"])
    assert info["all_subseeds"] == [77, 78] and info["subseed_strength"] == 0.3 and info["seed_resize_from_w"] == 48
    tiled = server.post("/sdapi/v1/txt2img", json={**body, "tiling": True, "batch_size": 1})
    seamless = Pipeline(models_dir / "tiny-a").generate(
        prompt="varied", width=64, height=64, steps=2, seed=12, subseed=77, subseed_strength=0.3, tiling=True,
        seed_resize_from_w=48, seed_resize_from_h=80, sampler="Euler", guidance=7.0,
    )  # fmt: skip
    got = Image.open(io.BytesIO(base64.b64decode(tiled.json()["images"][0])))
    np.testing.assert_array_equal(pixels(got), pixels(seamless.images[0]))
    plain = server.post("/sdapi/v1/txt2img", json={**body, "seed_enable_extras": False})
    assert json.loads(plain.json()["info"])["subseed_strength"] == 0
    assert "Variation seed" not in json.loads(plain.json()["info"])["infotexts"][0]


def test_sigma_settings_are_a1111_options(server, models_dir):
    """A1111's samplers read s_churn, s_tmin, s_tmax and s_noise from its settings (override_settings or POST
    /options), not from the request's fields, which change nothing there either."""
    from mlx_sd.pipeline import Pipeline

    body = {"prompt": "churn", "width": 64, "height": 64, "steps": 3, "seed": 5, "sampler_name": "Euler"}
    library = Pipeline(models_dir / "tiny-a")
    expected = library.generate(prompt="churn", width=64, height=64, steps=3, seed=5, sampler="Euler", guidance=7.0,
                                s_churn=0.5, s_noise=0.8, s_min_uncond=2.0)  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json={**body, "s_min_uncond": 2.0,
                                               "override_settings": {"s_churn": 0.5, "s_noise": 0.8}})  # fmt: skip
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    np.testing.assert_array_equal(pixels(got), pixels(expected.images[0]))
    plain = library.generate(prompt="churn", width=64, height=64, steps=3, seed=5, sampler="Euler", guidance=7.0)
    r = server.post("/sdapi/v1/txt2img", json={**body, "s_churn": 0.5})  # a request field: no effect, as in A1111
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    np.testing.assert_array_equal(pixels(got), pixels(plain.images[0]))
    assert server.post("/sdapi/v1/options", json={"s_noise": -1}).status_code == 422
    assert server.post("/sdapi/v1/options", json={"s_noise": 0.7}).json()["mlx_sd_ignored"] == []
    assert server.get("/sdapi/v1/options").json()["s_noise"] == 0.7
    assert server.post("/sdapi/v1/options", json={"s_noise": 1.0}).status_code == 200


def test_infotext_field_fills_what_the_request_leaves_unset(server, models_dir):
    """A1111's `infotext` field: the recorded parameters apply where the request sets nothing (here all but the
    seed), clip skip as a setting; the image equals the library's for the merged parameters."""
    from mlx_sd.pipeline import Pipeline

    text = ("a tower\nNegative prompt: fog\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, "
            "Seed: 3, Size: 64x48, Clip skip: 2, Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 2, "
            "Hires upscaler: Latent, Model hash: 0123456789")  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json={"infotext": text, "seed": 11})
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="a tower", negative_prompt="fog", steps=3, sampler="DPM++ 2M", schedule_type="Karras", guidance=5.0,
        seed=11, width=64, height=48, clip_skip=2, enable_hr=True, strength=0.5, hr_scale=1.5,
        hr_second_pass_steps=2, hr_upscaler="Latent",
    )  # fmt: skip
    assert got.size == (96, 72)
    np.testing.assert_array_equal(pixels(got), pixels(expected.images[0]))


def test_prompt_styles_apply_in_order(server, models_dir):
    """A1111's styles (the server's --styles styles.csv): "{prompt}" is replaced, other styles are appended."""
    from mlx_sd.pipeline import Pipeline

    assert [s["name"] for s in server.get("/sdapi/v1/prompt-styles").json()] == ["cinematic", "sharp"]
    body = {"prompt": "a cat", "negative_prompt": "blurry", "styles": ["cinematic", "sharp"], "width": 64,
            "height": 64, "steps": 2, "seed": 4}  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="cinematic still of a cat, film grain, sharp focus", negative_prompt="blurry, cartoon", width=64,
        height=64, steps=2, seed=4, sampler="Euler", guidance=7.0,
    )  # fmt: skip
    assert json.loads(r.json()["info"])["infotexts"] == expected.infotexts
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    np.testing.assert_array_equal(pixels(got), pixels(expected.images[0]))
    r = server.post("/sdapi/v1/txt2img", json={**body, "styles": ["noir"]})
    assert r.status_code == 422 and "cinematic, sharp" in r.json()["detail"]


def test_eta_noise_seed_delta_is_an_a1111_option(server, models_dir):
    """ENSD from override_settings (or POST /options, or a pasted infotext's "ENSD"): the library's image."""
    from mlx_sd.pipeline import Pipeline

    body = {"prompt": "ensd", "width": 64, "height": 64, "steps": 3, "seed": 7, "sampler_name": "Euler a"}
    expected = Pipeline(models_dir / "tiny-a").generate(
        prompt="ensd", width=64, height=64, steps=3, seed=7, sampler="Euler a", guidance=7.0, eta_noise_seed_delta=31337
    )
    for extra in ({"override_settings": {"eta_noise_seed_delta": 31337}}, {"infotext": expected.infotexts[0]}):
        r = server.post("/sdapi/v1/txt2img", json={**body, **extra})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        np.testing.assert_array_equal(pixels(got), pixels(expected.images[0]))
    assert server.post("/sdapi/v1/options", json={"eta_noise_seed_delta": -5}).status_code == 422


def _b64_png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_hires_checkpoint_runs_the_second_pass(server, models_dir):
    """hr_checkpoint_name (A1111's title or name) runs the hires pass with that model, as the library's
    `hires_model` does; the native API's `hr_checkpoint` too. The infotext names it. A `firstpass_image` stands for
    the first pass, as in the library."""
    from mlx_sd.pipeline import Pipeline

    body = {"prompt": "hires", "width": 64, "height": 48, "steps": 2, "seed": 8, "sampler_name": "Euler",
            "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 2,
            "denoising_strength": 0.5}  # fmt: skip
    titles = {m["model_name"]: m["title"] for m in server.get("/sdapi/v1/sd-models").json()}
    r = server.post("/sdapi/v1/txt2img", json={**body, "hr_checkpoint_name": titles["tiny-b"]})
    assert r.status_code == 200, r.text
    expected = Pipeline(models_dir / "tiny-a", hires_model=models_dir / "tiny-b").generate(
        prompt="hires", width=64, height=48, steps=2, seed=8, sampler="Euler", guidance=7.0, enable_hr=True,
        hr_scale=1.5, hr_upscaler="Lanczos", hr_second_pass_steps=2, strength=0.5,
    )  # fmt: skip
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    np.testing.assert_array_equal(pixels(got), pixels(expected.images[0]))
    info = json.loads(r.json()["info"])
    assert info["infotexts"] == expected.infotexts and "Hires checkpoint: tiny [" in info["infotexts"][0]
    first = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    r = server.post("/sdapi/v1/txt2img", json={**body, "firstpass_image": _b64_png(first)})
    assert r.status_code == 200, r.text
    given = Pipeline(models_dir / "tiny-a").generate(
        prompt="hires", width=64, height=48, steps=2, seed=8, sampler="Euler", guidance=7.0, enable_hr=True,
        hr_scale=1.5, hr_upscaler="Lanczos", hr_second_pass_steps=2, strength=0.5, firstpass_image=first,
    )  # fmt: skip
    np.testing.assert_array_equal(pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))),
                                  pixels(given.images[0]))  # fmt: skip
    same = server.post("/sdapi/v1/txt2img", json={**body, "hr_checkpoint_name": "tiny-a"})  # the loaded model
    assert "Hires checkpoint" not in json.loads(same.json()["info"])["infotexts"][0]
    native = {"prompt": "hires", "width": 64, "height": 48, "steps": 2, "seed": 8, "sampler": "Euler",
              "guidance": 7.0, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos",
              "hr_second_pass_steps": 2, "strength": 0.5, "hr_checkpoint": "tiny-b"}  # fmt: skip
    job = server.post("/v1/jobs", json=native)
    assert job.status_code == 202, job.text
    done = server.get(f"/v1/jobs/{job.json()['id']}/events", timeout=120)
    assert json.loads(done.text.strip().split("data: ")[-1])["status"] == "done"
    png = server.get(f"/v1/jobs/{job.json()['id']}/images/0").content
    np.testing.assert_array_equal(pixels(Image.open(io.BytesIO(png))), pixels(expected.images[0]))
    r = server.post("/v1/jobs", json={**native, "enable_hr": False})
    assert r.status_code == 422 and "hr_checkpoint" in r.text


def test_unsupported_fields_are_refused_by_name_and_unknown_ones_reported(server):
    base = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    cases = {"restore_faces": True,
             "alwayson_scripts": {"ADetailer": {"args": [True]}},
             "styles": ["my style"], "script_name": "X/Y/Z plot"}  # fmt: skip
    for field, value in cases.items():
        r = server.post("/sdapi/v1/txt2img", json={**base, field: value})
        assert r.status_code == 422, (field, r.text)
        body = r.json()
        assert set(body) == {"error", "detail", "body", "errors"} and body["detail"].startswith(f"{field}:")
    r = server.post("/sdapi/v1/txt2img", json={**base, "enable_hr": True, "firstpass_image": "abc"})
    assert r.status_code == 422 and r.json()["detail"].startswith("firstpass_image:"), r.text
    r = server.post("/sdapi/v1/txt2img", json={**base, "enable_hr": True, "hr_checkpoint_name": "other.safetensors"})
    assert r.status_code == 404 and r.json()["detail"].startswith("hr_checkpoint_name: model"), r.text
    init = _b64_png(Image.new("RGB", (64, 64), (200, 100, 50)))
    r = server.post("/sdapi/v1/img2img", json={**base, "init_images": [init], "latent_mask": "x"})
    assert r.status_code == 422 and r.json()["detail"].startswith("latent_mask:")

    # Neutral values of unsupported features, hires settings without enable_hr, and unknown fields are accepted.
    neutral = {"enable_hr": False, "restore_faces": False, "styles": [], "s_noise": 1, "hr_scale": 2,
               "hr_upscaler": "Latent", "alwayson_scripts": {}, "script_args": [], "eta": 1.0,
               "a_field_from_the_future": 1, "override_settings": {"sd_vae": "x.safetensors"}}  # fmt: skip
    r = server.post("/sdapi/v1/txt2img", json={**base, **neutral})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["mlx_sd_ignored"] == ["a_field_from_the_future", "override_settings.sd_vae"]

    r = server.post("/sdapi/v1/txt2img", json={**base, "sampler_name": "Euler b"})
    assert r.status_code == 422 and r.json()["detail"].startswith("sampler_name:") and "Euler a" in r.text
    r = server.post("/sdapi/v1/txt2img", json={**base, "width": 100})
    assert r.status_code == 422 and r.json()["detail"].startswith("width:")
    r = server.post("/sdapi/v1/txt2img", json={**base, "width": 256})
    assert r.status_code == 422 and "limit of 128" in r.json()["detail"]
    r = server.post("/sdapi/v1/txt2img", json={**base, "send_images": False})
    assert r.status_code == 200 and r.json()["images"] == []
    r = server.post("/sdapi/v1/img2img", json={**base, "init_images": ["not base64!"]})
    assert r.status_code == 422 and r.json()["detail"].startswith("init_images[0]:")


def test_models_options_and_switching(api, server):
    titles = [m["title"] for m in api.get_sd_models()]
    assert titles == ["tiny-a [a1a1a1a1a1]", "tiny-b [b2b2b2b2b2]"]
    assert api.util_get_current_model() == titles[0]
    try:
        api.util_set_model("tiny-b")
        assert api.get_options()["sd_model_checkpoint"] == titles[1]
        assert api.txt2img(prompt="b", width=64, height=64, steps=2).info["sd_model_hash"] == "b2b2b2b2b2"
        # A per-request override runs that model and leaves the default alone (A1111's restore-afterwards).
        override = api.txt2img(prompt="a", width=64, height=64, steps=2,
                               override_settings={"sd_model_checkpoint": "tiny-a [a1a1a1a1a1]"})  # fmt: skip
        assert override.info["sd_model_hash"] == "a1a1a1a1a1"
        assert api.get_options()["sd_model_checkpoint"] == titles[1]
    finally:
        api.set_options({"sd_model_checkpoint": "tiny-a.safetensors"})  # file names as A1111 clients send them
    assert api.get_options()["sd_model_checkpoint"] == titles[0]
    r = server.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 404 and "tiny-a" in r.json()["detail"]
    r = server.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}})
    assert r.status_code == 404


def test_listings(api):
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    schedulers = [s["name"] for s in api.get_schedulers()]
    assert schedulers[:3] == ["automatic", "uniform", "karras"]
    memory = api.get_memory()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    assert api.get_scripts() == {"txt2img": [], "img2img": ["sd upscale"]}
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in api.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"]


def test_progress_interrupt_and_skip(api, server):
    """A long job reports progress with a preview; skip finishes the current batch; interrupt stops the job."""
    outcome = {}

    def run():
        outcome["result"] = api.txt2img(prompt="long", width=64, height=64, steps=1000, n_iter=3, seed=11)

    thread = threading.Thread(target=run)
    thread.start()
    progress = wait_for(lambda: (p := api.get_progress())["state"]["sampling_step"] >= 2 and p, what="progress")
    assert progress["state"]["sampling_steps"] == 1000 and progress["state"]["job_count"] == 3
    assert 0 < progress["progress"] < 0.5 and progress["eta_relative"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (8, 8)  # one pixel per latent
    assert progress["textinfo"].startswith("Step ")
    api.skip()  # batch 1 is decoded as it is; batch 2 starts
    wait_for(lambda: api.get_progress()["state"]["job_no"] == 1, what="the second batch")
    api.interrupt()
    thread.join(30)
    assert not thread.is_alive()
    result = outcome["result"]
    assert len(result.images) == 1 and result.info["interrupted"] is True and result.info["all_seeds"] == [11]
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)  # the client's own idle check agrees
