"""Infotext round trips and compatibility with AUTOMATIC1111's published format."""

from PIL import Image

from mlx_sd.infotext import format_infotext, parse_infotext, read_infotext, request_fields, save_png
from mlx_sd.params import GenerationRequest

# The example in the docstring of A1111's parse_generation_parameters (its published format).
A1111_EXAMPLE = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, "
    "mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)


def test_parses_a1111_example():
    prompt, negative, params = parse_infotext(A1111_EXAMPLE)
    assert prompt.startswith("girl with an artist's beret") and prompt.endswith("intricate")
    assert negative.startswith("ugly, fat") and negative.endswith("messy drawing")
    assert params == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
    }


def test_round_trip_with_quoting_and_multiline(tmp_path):
    params = {
        "Steps": 30,
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": 7.5,
        "Seed": 4242,
        "Size": "640x448",
        "Model": "my, model: v2",  # needs quoting
        "Clip skip": None,  # left out
        "Version": "mlx-sd 0.1.0",
    }
    text = format_infotext("line one\nline two, (red:1.2)", "bad\nworse", params)
    assert "Clip skip" not in text and '"my, model: v2"' in text
    prompt, negative, parsed = parse_infotext(text)
    assert prompt == "line one\nline two, (red:1.2)" and negative == "bad\nworse"
    assert parsed == {k: str(v) for k, v in params.items() if v is not None}

    path = tmp_path / "out.png"
    save_png(Image.new("RGB", (8, 8), "red"), path, text)
    assert read_infotext(path) == text
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left behind


def test_no_negative_and_no_params():
    assert parse_infotext("just a prompt") == ("just a prompt", "", {})
    text = format_infotext("p", "", {"Steps": 1, "Sampler": "Euler", "Seed": 1})
    assert text == "p\nSteps: 1, Sampler: Euler, Seed: 1"


# An A1111 1.10 txt2img infotext with the hires fix, a variation seed, seed resize and a LoRA (fields as A1111 writes
# them: `create_infotext` in modules/processing.py).
A1111_HIRES = (
    "a castle on a hill <lora:detail:0.6>\n"
    "Negative prompt: lowres\n"
    "Steps: 25, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Variation seed: 99, Variation seed strength: 0.25, "
    "Seed resize from: 640x640, Denoising strength: 0.45, Clip skip: 2, RNG: CPU, NGMS: 0.5, Hires upscale: 1.5, "
    'Hires steps: 10, Hires upscaler: Latent (nearest-exact), Lora hashes: "detail: 3f2a1b", Version: v1.10.1'
)


def test_request_fields_from_an_a1111_hires_infotext():
    fields, not_applied = request_fields(A1111_HIRES)
    assert fields == {
        "prompt": "a castle on a hill <lora:detail:0.6>", "negative_prompt": "lowres", "steps": 25,
        "sampler": "DPM++ 2M SDE", "schedule_type": "Karras", "guidance": 6.5, "seed": 1234, "width": 512,
        "height": 768, "subseed": 99, "subseed_strength": 0.25, "seed_resize_from_w": 640, "seed_resize_from_h": 640,
        "strength": 0.45, "clip_skip": 2, "rng": "torch-cpu", "s_min_uncond": 0.5, "hr_scale": 1.5,
        "hr_second_pass_steps": 10, "hr_upscaler": "Latent (nearest-exact)", "enable_hr": True,
    }  # fmt: skip
    assert not_applied == {"Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Lora hashes": "detail: 3f2a1b",
                           "Version": "v1.10.1"}  # fmt: skip
    GenerationRequest(**fields).validate()


def test_request_fields_leave_out_what_they_cannot_reproduce():
    """A1111's GPU random source, and values that do not parse, are reported instead of applied."""
    fields, not_applied = request_fields("x\nSteps: many, Sampler: Euler, Seed: 3, RNG: NV, Size: 64x64")
    assert fields == {"prompt": "x", "negative_prompt": "", "sampler": "Euler", "seed": 3, "width": 64, "height": 64}
    assert not_applied == {"Steps": "many", "RNG": "NV"}
    fields, not_applied = request_fields("x\nSteps: 20, Sampler: Restart, Schedule type: Align Your Steps, Seed: 1")
    assert "sampler" not in fields and not_applied == {"Sampler": "Restart", "Schedule type": "Align Your Steps"}
    img2img, _ = request_fields("x\nSteps: 4, Sampler: Euler, Denoising strength: 0.3")
    assert img2img["strength"] == 0.3 and "enable_hr" not in img2img
