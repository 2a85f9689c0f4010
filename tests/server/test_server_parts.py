"""The server's pieces without a server: image decoding, A1111's png-info format, mask conventions, the model table."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from serving import require_serve_extra

require_serve_extra()

from mlx_sd.images import fill_masked  # noqa: E402
from mlx_sd_apps.server import codec  # noqa: E402
from mlx_sd_apps.server.a1111 import a1111_parameters  # noqa: E402
from mlx_sd_apps.server.config import parse_api_auth  # noqa: E402
from mlx_sd_apps.server.errors import ApiError, error_body  # noqa: E402
from mlx_sd_apps.server.openai_api import edit_mask, parse_size  # noqa: E402
from mlx_sd_apps.server.registry import ModelRegistry  # noqa: E402


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_decode_image_accepts_what_a1111_clients_send():
    image = Image.new("RGB", (16, 8), (1, 2, 3))
    data = png_b64(image)
    for form in (data, "data:image/png;base64," + data, data.rstrip("="), "\n".join([data[:10], data[10:]])):
        assert codec.decode_image(form, "f", 10_000).size == (16, 8)
    refusals = [
        ("", "empty"),
        ("%%%%", "not valid base64"),
        ("aGVsbG8=", "not a readable image"),
        ("https://example.com/a.png", "never fetches"),
        ("data:image/png,abc", "must be base64"),
    ]
    for bad, message in refusals:
        with pytest.raises(ApiError) as e:
            codec.decode_image(bad, "init_images[0]", 10_000)
        assert e.value.status == 422 and e.value.message.startswith("init_images[0]:") and message in e.value.message
    with pytest.raises(ApiError, match="larger than this server accepts"):
        codec.decode_image(data, "f", 100)


def test_truncated_and_corrupt_images_are_refused():
    raw = base64.b64decode(png_b64(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), "uint8"))))
    for broken in (raw[: len(raw) // 2], raw[:40] + b"\x00" * 100 + raw[140:]):
        with pytest.raises(ApiError, match="not a readable image"):
            codec.open_image(broken, "image", 10_000)


def test_png_info_parameters_in_a1111s_format():
    text = (
        'a cat, "quoted"\nNegative prompt: dog\n'
        'Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x768, Lora hashes: "a: 1, b: 2"'
    )
    params = a1111_parameters(text)
    assert params["Prompt"] == 'a cat, "quoted"' and params["Negative prompt"] == "dog"
    assert (params["Size-1"], params["Size-2"], params["Steps"], params["Seed"]) == ("512", "768", "20", "1")
    assert params["Lora hashes"] == "a: 1, b: 2" and params["Clip skip"] == "1"  # A1111's default when absent


def test_fill_keeps_the_unmasked_area_and_fills_the_hole_with_its_surroundings():
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    image.paste((40, 40, 200), (0, 32, 64, 64))  # red top, blue bottom
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 8, 48, 24))  # a hole in the red half
    filled = np.asarray(fill_masked(image, mask), dtype=int)
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(filled[keep], np.asarray(image, dtype=int)[keep])
    hole = filled[8:24, 16:48]
    assert hole[..., 0].mean() > 150 and hole[..., 2].mean() < 100  # red, from around it


def test_openai_mask_conventions():
    image = Image.new("RGB", (8, 8))
    mask = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    mask.putpixel((1, 1), (0, 0, 0, 0))
    repaint = np.asarray(edit_mask(image, mask))
    assert repaint[1, 1] == 255 and repaint.sum() == 255  # transparent = repaint
    transparent_image = Image.new("RGBA", (8, 8), (9, 9, 9, 255))
    transparent_image.putpixel((2, 3), (0, 0, 0, 0))
    assert np.asarray(edit_mask(transparent_image, None))[3, 2] == 255  # DALL-E 2: the image's own alpha
    assert edit_mask(Image.new("RGBA", (8, 8), (1, 1, 1, 255)), None) is None  # opaque: edit everything
    assert np.asarray(edit_mask(image, Image.new("L", (8, 8), 255))).min() == 255  # no alpha: white = repaint


def test_sizes_and_auth_settings():
    assert parse_size("auto") == (None, None) and parse_size("1024x768") == (1024, 768)
    for bad in ("1024", "x", "1024x-8", "100x100", "4x8", "99999999x64"):
        with pytest.raises(ApiError):
            parse_size(bad)
    assert parse_api_auth("a:b, c:d:e") == {"a": "b", "c": "d:e"}
    with pytest.raises(ValueError):
        parse_api_auth("nopassword")


def test_error_shapes():
    error = ApiError(422, "width: must be a multiple of 8", param="width")
    assert error_body("/sdapi/v1/txt2img", error) == {"error": "UnprocessableEntity", "detail": error.message,
                                                      "body": "", "errors": error.message}  # fmt: skip
    assert error_body("/v1/jobs", error) == {"error": {"message": error.message, "type": "invalid_request_error",
                                                       "param": "width", "code": None}}  # fmt: skip


def test_registry_names_and_refusals(tmp_path):
    for name, sha in (("one", "12" * 32), ("two", "")):
        folder = tmp_path / name
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text(json.dumps({"in_channels": 9 if name == "two" else 4}))
        (folder / "mlx_sd.json").write_text(json.dumps({"family": "sd1", "prediction_type": "epsilon",
                                                        "name": name, "sha256": sha}))  # fmt: skip
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "mlx_sd.json").write_text("{not json")
    registry = ModelRegistry(tmp_path)
    assert [(e.name, e.title, e.inpainting) for e in registry.list()] == [("one", "one [1212121212]", False),
                                                                          ("two", "two", True)]  # fmt: skip
    for key in ("one", "one [1212121212]", "1212121212", "12" * 32, "one.safetensors", "one.ckpt"):
        assert registry.find(key).name == "one", key
    for key in ("", "on", str(tmp_path / "one"), "../one", "broken", "two [x]"):
        assert registry.find(key) is None, key


def test_browser_guard_rules():
    from mlx_sd_apps.server.app import BrowserGuard
    from mlx_sd_apps.server.config import LOOPBACK_HOSTS

    def scope(host, origin=None):
        headers = [(b"host", host.encode())] + ([(b"origin", origin.encode())] if origin else [])
        return {"type": "http", "scheme": "http", "path": "/v1/jobs", "headers": headers}

    guard = BrowserGuard(None, allowed_origins=("http://app.example:3000",), allowed_hosts=LOOPBACK_HOSTS)
    local = "127.0.0.1:7860"
    allowed = [scope(local), scope("localhost:7860"), scope("[::1]:7860"), scope("localhost"),
               scope(local, "http://127.0.0.1:7860"), scope(local, "http://app.example:3000")]  # fmt: skip
    refused = [scope("evil.example:7860"), scope("127.0.0.1.evil.example"), scope(local, "null"),
               scope(local, "http://localhost:7860"), scope(local, "https://evil.example")]  # fmt: skip
    assert [guard._check(s) for s in allowed] == [None] * len(allowed)
    assert all(guard._check(s) for s in refused)
    anywhere = BrowserGuard(None, allowed_origins=(), allowed_hosts=None)  # bound to a LAN address
    assert anywhere._check(scope("192.168.1.5:7860")) is None and anywhere._check(scope("x", "http://y"))


def test_styles_csv_as_a1111_writes_it(tmp_path):
    from mlx_sd_apps.server.config import read_styles

    path = tmp_path / "styles.csv"
    path.write_text('name,prompt,negative_prompt\n"a, b","x {prompt}","y"\n"",ignored,\nold,,\n', encoding="utf-8")
    assert read_styles(path) == {"a, b": ("x {prompt}", "y"), "old": ("", "")}
    path.write_text("name,text\nlegacy,painted\n")  # A1111's old column name
    assert read_styles(path) == {"legacy": ("painted", "")}
    path.write_text("title,prompt\nx,y\n")
    with pytest.raises(ValueError, match="no 'name' column"):
        read_styles(path)
    with pytest.raises(ValueError, match="cannot read"):
        read_styles(tmp_path / "missing.csv")


def test_an_infotext_fills_img2img_fields_in_the_apis_own_codes():
    from mlx_sd_apps.server.a1111 import Img2ImgRequest, _with_infotext

    text = "x\nSteps: 3, Sampler: Euler, Seed: 5, Masked content: latent noise, Noise multiplier: 0.9, Clip skip: 2"
    req = _with_infotext(Img2ImgRequest(infotext=text, steps=4))
    assert (req.inpainting_fill, req.initial_noise_multiplier, req.seed, req.steps) == (2, 0.9, 5, 4)
    assert req.override_settings == {"CLIP_stop_at_last_layers": 2} and req.infotext is None
