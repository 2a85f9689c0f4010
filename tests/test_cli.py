"""The `mlx-sd` command, run as users run it (subprocess): generate, info, samplers, and one-line user errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_pipelines import mlx_folder, tiny_components

from mlx_sd.infotext import parse_infotext, read_infotext

CLI = [sys.executable, "-m", "mlx_sd_apps.cli"]


def run(*args, cwd=None, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    return mlx_folder(tiny_components(tmp, "sd1"), tmp / "model", "sd1")


def test_generate_writes_png_with_infotext_and_info_reads_it(model, tmp_path):
    output = tmp_path / "img-{i}-{seed}.png"
    out = run("generate", "a (red:1.2) boat", "--model", model, "--width", 64, "--height", 48, "--steps", 3,
              "--seed", 5, "--num-images", 2, "--sampler", "Euler a", "--output", output)  # fmt: skip
    assert out.returncode == 0, out.stderr
    paths = sorted(tmp_path.glob("img-*.png"))
    assert [p.name for p in paths] == ["img-0-5.png", "img-1-6.png"]
    assert Image.open(paths[0]).size == (64, 48)
    prompt, _, params = parse_infotext(read_infotext(paths[1]))
    assert prompt == "a (red:1.2) boat" and params["Seed"] == "6" and params["Sampler"] == "Euler a"
    info = run("info", paths[1])
    assert info.returncode == 0 and "Seed: 6" in info.stdout and "Prompt: a (red:1.2) boat" in info.stdout


def test_img2img_and_inpaint_from_cli(model, tmp_path):
    Image.new("RGB", (80, 64), (120, 30, 30)).save(tmp_path / "init.png")
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (20, 16, 60, 48))
    mask.save(tmp_path / "mask.png")
    out = run("generate", "x", "--model", model, "--init-image", tmp_path / "init.png", "--mask", tmp_path / "mask.png",
              "--steps", 2, "--strength", 0.8, "--output", tmp_path / "out.png", "--seed", 1)  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = Image.open(tmp_path / "out.png")
    assert result.size == (80, 64)
    assert result.getpixel((0, 0)) == (120, 30, 30)  # pasted back outside the mask


def test_hires_fix_from_cli(model, tmp_path):
    out = run("generate", "x", "--model", model, "--width", 64, "--height", 48, "--steps", 2, "--seed", 3,
              "--enable-hr", "--hr-scale", 1.5, "--hr-upscaler", "Lanczos", "--hr-second-pass-steps", 2,
              "--strength", 0.5, "--subseed", 4, "--subseed-strength", 0.2, "--tiling",
              "--output", tmp_path / "hr.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "hr.png").size == (96, 72)
    params = parse_infotext(read_infotext(tmp_path / "hr.png"))[2]
    assert params["Size"] == "64x48" and params["Hires upscaler"] == "Lanczos" and params["Hires steps"] == "2"
    assert params["Variation seed"] == "4" and params["Variation seed strength"] == "0.2" and params["Tiling"] == "True"
    bad = run("generate", "x", "--model", model, "--enable-hr", "--init-image", tmp_path / "hr.png")
    assert bad.returncode != 0 and "txt2img" in bad.stderr and "Traceback" not in bad.stderr
    other = mlx_folder(tiny_components(tmp_path / "other", "sd1", seed=5), tmp_path / "other-model", "sd1")
    out = run("generate", "x", "--model", model, "--width", 64, "--height", 48, "--steps", 2, "--seed", 3,
              "--enable-hr", "--hr-scale", 1.5, "--hr-second-pass-steps", 2, "--hr-checkpoint", other,
              "--output", tmp_path / "hr2.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert parse_infotext(read_infotext(tmp_path / "hr2.png"))[2]["Hires checkpoint"] == "tiny"
    bad = run("generate", "x", "--model", model, "--hr-checkpoint", other)
    assert bad.returncode == 2 and "--hr-checkpoint needs --enable-hr" in bad.stderr


def test_params_from_a_png_makes_it_again_and_flags_override(model, tmp_path):
    out = run("generate", "a red boat", "--model", model, "--width", 64, "--height", 48, "--steps", 2, "--seed", 8,
              "--sampler", "Euler a", "--output", tmp_path / "first.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    again = run(
        "generate", "--model", model, "--params-from", tmp_path / "first.png", "--output", tmp_path / "again.png"
    )
    assert again.returncode == 0, again.stderr
    first, second = Image.open(tmp_path / "first.png"), Image.open(tmp_path / "again.png")
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert read_infotext(tmp_path / "first.png") == read_infotext(tmp_path / "again.png")
    other = run("generate", "--model", model, "--params-from", tmp_path / "first.png", "--seed", 9, "--eta", 0.6,
                "--eta-noise-seed-delta", 31337, "--output", tmp_path / "other.png")  # fmt: skip
    params = parse_infotext(read_infotext(tmp_path / "other.png"))[2]
    assert other.returncode == 0 and params["Seed"] == "9" and params["Sampler"] == "Euler a"
    assert params["Eta"] == "0.6" and params["ENSD"] == "31337"
    missing = run("generate", "--model", model)
    assert missing.returncode != 0 and "give a prompt" in missing.stderr


def test_controlnets_from_cli(model, tmp_path):
    import mlx.core as mx
    from test_controlnet import tiny_controlnet

    from mlx_sd.controlnet import ControlNetUnit
    from mlx_sd.pipeline import Pipeline
    from mlx_sd_convert.controlnet import read_controlnet

    tiny_controlnet("sd1", 11).save_pretrained(tmp_path / "lib" / "edges")
    tiny_controlnet("sd1", 12).save_pretrained(tmp_path / "depth")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    out = run("generate", "x", "--model", model, "--width", 64, "--height", 48, "--steps", 3, "--seed", 2,
              "--controlnet-dir", tmp_path / "lib", "--controlnet", "edges", tmp_path / "a.png",
              "--controlnet", tmp_path / "depth", tmp_path / "b.png", "--control-weight", 0.6,
              "--control-weight", 1.2, "--control-end", 0.7, "--control-mode", "prompt",
              "--control-hr-option", "both", "--control-hr-option", "low_res_only",
              "--output", tmp_path / "cn.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    params = parse_infotext(read_infotext(tmp_path / "cn.png"))[2]
    assert "Model: edges, Weight: 0.6" in params["ControlNet 0"] and "Guidance End: 0.7" in params["ControlNet 0"]
    assert "Model: depth, Weight: 1.2" in params["ControlNet 1"]
    assert "My prompt is more important" in params["ControlNet 1"]
    assert "Hr Option: Low res only" in params["ControlNet 1"] and "Hr Option" not in params["ControlNet 0"]
    units = [
        ControlNetUnit(read_controlnet(tmp_path / f, mx.float32), Image.open(tmp_path / i), w, guidance_end=0.7,
                       control_mode="prompt")
        for f, i, w in (("lib/edges", "a.png", 0.6), ("depth", "b.png", 1.2))
    ]  # fmt: skip
    expected = Pipeline(model).generate(prompt="x", width=64, height=48, steps=3, seed=2, controlnet=tuple(units))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cn.png")), np.asarray(expected.images[0]))
    bad = run("generate", "x", "--model", model, "--controlnet", tmp_path / "depth", tmp_path / "a.png",
              "--control-weight", 1, "--control-weight", 2)  # fmt: skip
    assert bad.returncode == 2 and "given 2 times for 1 ControlNets" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("generate", "x", "--model", model, "--controlnet", tmp_path / "depth", tmp_path / "a.png",
              "--control-hr-option", "sometimes")  # fmt: skip
    assert bad.returncode == 2 and "hr_option='sometimes'" in bad.stderr and "Traceback" not in bad.stderr
    bad = run("generate", "x", "--model", model, "--controlnet", "canny", tmp_path / "a.png")
    assert bad.returncode == 2 and "--controlnet-dir" in bad.stderr
    # a reference unit: no model ("none"), the UNet itself
    out = run("generate", "x", "--model", model, "--width", 64, "--height", 48, "--steps", 3, "--seed", 2,
              "--controlnet", "none", tmp_path / "a.png", "--control-module", "reference_adain+attn",
              "--output", tmp_path / "ref.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    unit = ControlNetUnit(None, Image.open(tmp_path / "a.png"), module="reference_adain+attn")
    expected = Pipeline(model).generate(prompt="x", width=64, height=48, steps=3, seed=2, controlnet=(unit,))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ref.png")), np.asarray(expected.images[0]))


def test_ip_adapter_from_cli(model, tmp_path):
    import mlx.core as mx
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from test_ip_adapter import tiny_encoder, tiny_ip_state
    from tiny_pipelines import UNETS

    from mlx_sd.pipeline import Pipeline
    from mlx_sd_convert.ip_adapter import read_ip_adapter

    tiny_encoder(tmp_path / "image_encoder")
    state = tiny_ip_state(UNet2DConditionModel(**UNETS["sd1"]))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ip.safetensors")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    flags = ["--ip-adapter", tmp_path / "ip.safetensors", "--image-encoder", tmp_path / "image_encoder"]
    out = run("generate", "x", "--model", model, "--width", 64, "--height", 64, "--steps", 2, "--seed", 3, *flags,
              "--ip-adapter-image", tmp_path / "p.png", "--ip-adapter-scale", 0.6,
              "--output", tmp_path / "ip.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "IP-Adapter weight: 0.6" in read_infotext(tmp_path / "ip.png")
    adapter = read_ip_adapter(tmp_path / "ip.safetensors", tmp_path / "image_encoder", mx.float32)
    expected = Pipeline(model, ip_adapter=adapter).generate(prompt="x", width=64, height=64, steps=2, seed=3,
                                                            ip_adapter_image=Image.open(tmp_path / "p.png"),
                                                            ip_adapter_scale=0.6)  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ip.png")), np.asarray(expected.images[0]))
    bad = run("generate", "x", "--model", model, *flags)
    assert bad.returncode == 2 and "--ip-adapter-image" in bad.stderr and "Traceback" not in bad.stderr


def test_model_upscalers_from_cli(model, tmp_path):
    """--hr-upscaler by A1111's name in --upscaler-dir, then `mlx-sd upscale` with a model file (A1111's Extras)."""
    from a1111_upscale import load_descriptor, upscale, upscale_with_model
    from test_model_upscaler import FILES, _close_images, _save

    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    _save(folder, "RealESRGAN_x4plus.pth", FILES["RealESRGAN_x4plus.pth"]())
    state = FILES["ESRGAN_4x.pth"]()
    esrgan = _save(tmp_path, "4x-Tiny.pth", state)
    out = run("generate", "x", "--model", model, "--width", 64, "--height", 48, "--steps", 2, "--seed", 3,
              "--enable-hr", "--hr-upscaler", "R-ESRGAN 4x+", "--upscaler-dir", folder, "--hr-second-pass-steps", 1,
              "--strength", 0.5, "--output", tmp_path / "hr.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    hires = Image.open(tmp_path / "hr.png")
    assert hires.size == (128, 96) and parse_infotext(read_infotext(hires))[2]["Hires upscaler"] == "R-ESRGAN 4x+"

    out = run("upscale", tmp_path / "hr.png", "--upscaler", esrgan, "--scale", 2, "--tile", 64,
              "--output", tmp_path / "{stem}-2x.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    upscaled = Image.open(tmp_path / "hr-2x.png")
    assert upscaled.info["parameters"] == hires.info["parameters"]  # the generation parameters kept, as A1111
    assert upscaled.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: 4x-Tiny"
    descriptor = load_descriptor(state)
    expected = upscale(hires.convert("RGB"), 2.0, lambda im: upscale_with_model(descriptor, im, 64, 8))
    _close_images(upscaled, expected)

    out = run("generate", "x", "--model", model, "--init-image", tmp_path / "hr.png", "--width", 64, "--height", 64,
              "--steps", 3, "--strength", 0.5, "--sd-upscale", "--sd-upscale-upscaler", "R-ESRGAN 4x+",
              "--upscaler-dir", folder, "--sd-upscale-scale", 1.5, "--sd-upscale-overlap", 16,
              "--output", tmp_path / "sdup.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    params = parse_infotext(read_infotext(tmp_path / "sdup.png"))[2]
    assert Image.open(tmp_path / "sdup.png").size == (192, 144)  # 128x96 x 1.5, redrawn in 64x64 tiles
    assert params["SD upscale upscaler"] == "R-ESRGAN 4x+" and params["SD upscale overlap"] == "16"

    errors = [
        (("generate", "x", "--model", model, "--sd-upscale"), "give init_image"),
        (("upscale", tmp_path / "hr.png", "--upscaler", "R-ESRGAN 4x+"), "--upscaler-dir"),
        (("upscale", tmp_path / "hr.png", "--upscaler", "Lanczos", "--output", tmp_path / "hr.png"), "overwrite"),
        (("upscale", tmp_path / "hr.png", "--upscaler", "Lanczos", "--size", "2x"), "WIDTHxHEIGHT"),
        (("upscale", tmp_path / "hr.png", "--upscaler", esrgan, "--tile", 8), "below the tile"),
        (("generate", "x", "--model", model, "--enable-hr", "--hr-upscaler", "4x-Missing", "--upscaler-dir", folder),
         "'4x-Missing' not found"),
    ]  # fmt: skip
    for args, message in errors:
        bad = run(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert Image.open(tmp_path / "hr.png").size == (128, 96)  # never overwritten


def test_sd3_convert_and_generate_from_cli(tmp_path):
    """An SD3 diffusers folder converted and run by the CLI: the library's image, pixel for pixel, and its
    infotext (the pipeline itself is checked against diffusers in tests/test_sd3_pipeline.py)."""
    from tiny_sd3 import tiny_sd3

    from mlx_sd.pipeline import Pipeline

    tiny_sd3(tmp_path).save_pretrained(tmp_path / "sd3-diffusers")
    out = run("convert", tmp_path / "sd3-diffusers", tmp_path / "sd3", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    out = run("generate", "a red lighthouse", "--model", tmp_path / "sd3", "--width", 64, "--height", 48, "--steps", 6,
              "--seed", 4, "--skip-guidance-layers", "0", "--skip-layer-guidance-stop", 0.5,
              "--output", tmp_path / "sd3.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    expected = Pipeline(tmp_path / "sd3").generate(prompt="a red lighthouse", width=64, height=48, steps=6, seed=4,
                                                   skip_guidance_layers=(0,), skip_layer_guidance_stop=0.5)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "sd3.png")), np.asarray(expected.images[0]))
    params = parse_infotext(read_infotext(tmp_path / "sd3.png"))[2]
    assert params["Sampler"] == "Euler" and params["CFG scale"] == "7.0", params
    assert (params["SLG layers"], params["SLG stop"]) == ("0", "0.5"), params
    again = run("generate", "--params-from", tmp_path / "sd3.png", "--model", tmp_path / "sd3", "--output",
                tmp_path / "again.png")  # fmt: skip
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(expected.images[0]))
    refused = run("generate", "x", "--model", tmp_path / "sd3", "--sampler", "DDIM", "--steps", 1)
    assert refused.returncode != 0 and "rectified-flow" in refused.stderr and "Traceback" not in refused.stderr


def test_samplers_listing():
    out = run("samplers", "--json")
    assert out.returncode == 0
    names = [s["name"] for s in json.loads(out.stdout)["samplers"]]
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC", "LCM"} <= set(names)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "65"], "width=65"),
        (["--sampler", "Euler aa"], "unknown sampler"),
        (["--steps", "0"], "steps"),
        (["--init-image", "missing.png"], "missing.png does not exist"),
        (["--mask", "m.png"], "--mask needs --init-image"),
    ],
)
def test_user_errors_are_one_line(model, args, message):
    out = run("generate", "x", "--model", model, *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_info_on_an_image_without_parameters(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    out = run("info", tmp_path / "plain.png")
    assert out.returncode == 2 and "no generation parameters" in out.stderr
    assert Path(tmp_path / "plain.png").exists()


def test_default_model_offline_fails_fast_with_a_way_forward(tmp_path):
    import time

    start = time.monotonic()
    out = run("generate", "a lighthouse", env={"HF_HUB_OFFLINE": "1", "MLX_SD_CACHE": str(tmp_path)})
    assert out.returncode == 2 and time.monotonic() - start < 60
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in out.stderr and "mlx-sd convert" in out.stderr
    assert "Traceback" not in out.stderr and not list(tmp_path.iterdir())  # nothing half-written in the cache
