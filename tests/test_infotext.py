"""Infotext round trips and compatibility with AUTOMATIC1111's published format."""

from PIL import Image

from mlx_sd.infotext import format_infotext, parse_infotext, read_infotext, save_png

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
