"""The SDXL family end to end against diffusers, tiny random-weight models, torch RNG mode, PSNR >= 40 dB.

- The refiner alone: StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score (bigG only, aesthetic scores).
- The base -> refiner hand-off: StableDiffusionXLPipeline(denoising_end) then StableDiffusionXLImg2ImgPipeline
  (denoising_start) on its latents, against one `Pipeline(base, refiner)` run with refiner_switch_at; img2img too.
- Inpainting: StableDiffusionXLInpaintPipeline with a 4-channel (latent blending) and a 9-channel UNet.
- Turbo: a model converted with kind "turbo" run on its defaults (1 step of Euler a, no guidance, 512x512) against
  diffusers with sdxl-turbo's published scheduler (EulerAncestralDiscreteScheduler, "trailing").

Base and refiner are the tiny SDXL models of tests/sgm_fixtures.py, converted from diffusers folders by
`mlx_sd_convert.convert`; like the published pair, they share the VAE and the bigG text tower.
"""

import numpy as np
import pytest
from PIL import Image
from sgm_fixtures import diffusers_parts, diffusers_pipeline, write_diffusers_folder
from test_pipeline import check, generators, saved_config
from tiny_pipelines import mlx_folder, tiny_components

from mlx_sd.model import StableDiffusion
from mlx_sd.pipeline import Pipeline
from mlx_sd_convert import convert
from oracles import assert_close

PROMPT = "a red fox in the snow, watercolor"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-family")
    for kind in ("base", "refiner"):
        convert(write_diffusers_folder(tmp / f"{kind}-diffusers", kind), tmp / kind, dtype="float32")
    return StableDiffusion(tmp / "base"), StableDiffusion(tmp / "refiner")


def reference(kind, scheduler="EulerDiscreteScheduler", img2img=False):
    import diffusers

    pipe = diffusers_pipeline(kind)
    if img2img and kind == "base":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components, force_zeros_for_empty_prompt=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(saved_config(diffusers_parts(kind)["scheduler"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_image(w=64, h=64, seed=4):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_manifests_record_the_pipeline_flags(models):
    base, refiner = models
    assert (base.info.family, base.info.force_zeros_for_empty_prompt, base.info.requires_aesthetics_score) == (
        "sdxl", True, False)  # fmt: skip
    assert (refiner.info.family, refiner.info.force_zeros_for_empty_prompt, refiner.info.requires_aesthetics_score) == (
        "sdxl-refiner", False, True)  # fmt: skip
    assert [t.tokenizer.pad_token_id for t in base.text_encoder().towers] == [49407, 0]
    assert [t.tokenizer.pad_token_id for t in refiner.text_encoder().towers] == [0]


@pytest.mark.parametrize("negative", ["", NEGATIVE])
def test_refiner_img2img_with_aesthetic_scores_matches_diffusers(models, negative):
    _, refiner = models
    pipe = reference("refiner")
    kwargs = dict(strength=0.5, guidance=5.0, steps=6, seed=8)
    expected = pipe(
        PROMPT, negative_prompt=negative or None, image=init_image(), strength=0.5, num_inference_steps=6,
        guidance_scale=5.0, aesthetic_score=7.5, negative_aesthetic_score=1.5, generator=generators(8, 1),
        output_type="np",
    ).images  # fmt: skip
    result = Pipeline(refiner).generate(
        prompt=PROMPT, negative_prompt=negative, init_image=init_image(), sampler="EulerDiscreteScheduler",
        aesthetic_score=7.5, negative_aesthetic_score=1.5, **kwargs,
    )  # fmt: skip
    check(result, expected, f"refiner img2img negative={negative!r}")


@pytest.mark.parametrize(
    "scheduler,switch_at", [("EulerDiscreteScheduler", 0.8), ("EulerAncestralDiscreteScheduler", 0.55)]
)
def test_base_to_refiner_handoff_matches_diffusers(models, scheduler, switch_at):
    base, refiner = models
    steps, guidance, seed = 6, 5.0, 21
    generator = generators(seed, 1)  # one generator through both pipelines: Euler a's noise carries on
    latents = reference("base", scheduler)(
        PROMPT, negative_prompt=NEGATIVE, width=64, height=80, num_inference_steps=steps, guidance_scale=guidance,
        denoising_end=switch_at, generator=generator, output_type="latent",
    ).images  # fmt: skip
    expected = reference("refiner", scheduler)(
        PROMPT, negative_prompt=NEGATIVE, image=latents, num_inference_steps=steps, guidance_scale=guidance,
        denoising_start=switch_at, generator=generator, output_type="np",
    ).images  # fmt: skip
    result = Pipeline(base, refiner=refiner).generate(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=80, steps=steps, guidance=guidance, seed=seed,
        sampler=scheduler, refiner_switch_at=switch_at,
    )  # fmt: skip
    check(result, expected, f"hand-off {scheduler} at {switch_at}")
    assert "Refiner: refiner" in result.infotexts[0] and f"Refiner switch at: {switch_at}" in result.infotexts[0]


def test_img2img_handoff_matches_diffusers(models):
    base, refiner = models
    generator = generators(5, 1)
    latents = reference("base", img2img=True)(
        PROMPT, image=init_image(64, 64, 7), strength=0.7, num_inference_steps=8, guidance_scale=4.0,
        denoising_end=0.75, generator=generator, output_type="latent",
    ).images  # fmt: skip
    expected = reference("refiner")(
        PROMPT, image=latents, num_inference_steps=8, guidance_scale=4.0, denoising_start=0.75, generator=generator,
        output_type="np",
    ).images  # fmt: skip
    result = Pipeline(base, refiner=refiner).generate(
        prompt=PROMPT, init_image=init_image(64, 64, 7), strength=0.7, steps=8, guidance=4.0, seed=5,
        sampler="EulerDiscreteScheduler", refiner_switch_at=0.75,
    )  # fmt: skip
    check(result, expected, "img2img hand-off at 0.75")


def test_embeddings_reach_the_refiner_as_in_diffusers(models, tmp_path):
    """An SDXL embedding (clip_l + clip_g) loaded once: the base takes both, the refiner its clip_g vectors (diffusers:
    load_textual_inversion into each pipeline's encoders), and the hand-off image matches."""
    import copy

    import torch
    from safetensors.numpy import save_file

    from mlx_sd_convert.embeddings import read_embedding

    base, refiner = models
    rng = np.random.default_rng(9)
    vectors = {"clip_l": rng.normal(0, 0.5, (2, 64)).astype(np.float32),
               "clip_g": rng.normal(0, 0.5, (2, 128)).astype(np.float32)}  # fmt: skip
    save_file(vectors, str(tmp_path / "foxemb.safetensors"))
    prompt, generator = "a foxemb in the snow", generators(4, 1)
    # copies: load_textual_inversion changes the tokenizers and encoders the other tests' pipelines share
    pipes = {kind: copy.deepcopy(reference(kind)) for kind in ("base", "refiner")}
    for pipe in pipes.values():
        for key, suffix in (("clip_l", ""), ("clip_g", "_2")):
            if getattr(pipe, f"text_encoder{suffix}", None) is not None:
                pipe.load_textual_inversion(torch.from_numpy(vectors[key]), token="foxemb",
                                            text_encoder=getattr(pipe, f"text_encoder{suffix}"),
                                            tokenizer=getattr(pipe, f"tokenizer{suffix}"))  # fmt: skip
    latents = pipes["base"](prompt, width=64, height=64, num_inference_steps=6, guidance_scale=5.0,
                            denoising_end=0.7, generator=generator, output_type="latent").images  # fmt: skip
    expected = pipes["refiner"](prompt, image=latents, num_inference_steps=6, guidance_scale=5.0,
                                denoising_start=0.7, generator=generator, output_type="np").images  # fmt: skip
    ours = Pipeline(base, refiner=refiner)
    ours.load_embeddings([read_embedding(tmp_path / "foxemb.safetensors")])
    result = ours.generate(prompt=prompt, width=64, height=64, steps=6, guidance=5.0, seed=4,
                           sampler="EulerDiscreteScheduler", refiner_switch_at=0.7)  # fmt: skip
    check(result, expected, "embedding through the hand-off")
    assert "TI hashes: " in result.infotexts[0]
    with torch.no_grad():  # the refiner's own encoding of the prompt, which 8-bit images barely show
        embeds, _, pooled, _ = pipes["refiner"].encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    cond, _ = ours.refiner.text.encode([prompt])
    assert_close(np.array(cond.context), embeds.numpy(), 1e-4, "refiner context with the embedding")
    assert_close(np.array(cond.pooled), pooled.numpy(), 1e-4, "refiner pooled with the embedding")


def _corner_mask():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 40, 40))
    return mask


def test_inpainting_with_a_refiner_hands_off_transparently(models):
    """Inpainting goes on pasting the known region back under the refiner: with the base standing in as its own
    refiner the image equals the base's alone, bit for bit; with the refiner it is the refiner's work below the
    switch, deterministic."""
    base, refiner = models
    request = dict(prompt=PROMPT, init_image=init_image(64, 64, 3), mask=_corner_mask(), strength=0.8, steps=6,
                   guidance=4.0, seed=8, sampler="Euler a")  # fmt: skip
    alone = Pipeline(base).generate(**request)
    itself = Pipeline(base, refiner=base).generate(**request, refiner_switch_at=0.5)
    assert np.array_equal(np.asarray(itself.images[0]), np.asarray(alone.images[0]))
    refined = Pipeline(base, refiner=refiner)
    first, again = (refined.generate(**request, refiner_switch_at=0.5) for _ in range(2))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(alone.images[0]))
    assert "Refiner switch at: 0.5" in first.infotexts[0]


def test_refiner_requests_are_checked(models, tmp_path):
    base, refiner = models
    with pytest.raises(ValueError, match="refiner_switch_at needs a refiner"):
        Pipeline(base).generate(prompt="x", width=64, height=64, steps=1, refiner_switch_at=0.5)
    both = Pipeline(base, refiner=refiner)
    with pytest.raises(ValueError, match="refiner_switch_at=1.5"):
        both.generate(prompt="x", width=64, height=64, steps=2, refiner_switch_at=1.5)
    sd1 = StableDiffusion(mlx_folder(tiny_components(tmp_path, "sd1"), tmp_path / "sd1", "sd1"))
    with pytest.raises(ValueError, match="cannot refine.*latent spaces differ"):
        Pipeline(base, refiner=sd1)
    with pytest.raises(ValueError, match="cannot refine"):
        both.set_refiner(sd1)
    assert both.refiner is refiner  # a refused refiner leaves the current one in place
    # switch_at 1: the base runs every step; the refiner never does, the base decodes.
    never = both.generate(prompt=PROMPT, width=64, height=64, steps=3, seed=2, refiner_switch_at=1.0)
    alone = Pipeline(base).generate(prompt=PROMPT, width=64, height=64, steps=3, seed=2)
    assert np.array_equal(np.asarray(never.images[0]), np.asarray(alone.images[0]))
    both.set_refiner(None)  # detached: requests run the base alone
    detached = both.generate(prompt=PROMPT, width=64, height=64, steps=3, seed=2)
    assert np.array_equal(np.asarray(detached.images[0]), np.asarray(alone.images[0]))
    assert "Refiner" not in never.infotexts[0]


# --- inpainting ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpaint_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-inpaint")
    out = {}
    for channels in (4, 9):
        parts = tiny_components(tmp / str(channels), "sdxl", in_channels=channels, seed=3)
        out[channels] = (
            parts,
            Pipeline(mlx_folder(parts, tmp / f"mlx{channels}", "sdxl", force_zeros_for_empty_prompt=True)),
        )
    return out


@pytest.mark.parametrize("channels,strength", [(4, 0.8), (9, 1.0)])
def test_sdxl_inpaint_matches_diffusers(inpaint_models, channels, strength):
    import diffusers

    parts, ours = inpaint_models[channels]
    pipe = diffusers.StableDiffusionXLInpaintPipeline(
        **{k: v for k, v in parts.items() if k != "scheduler"},
        scheduler=diffusers.EulerDiscreteScheduler.from_config(saved_config(parts["scheduler"])),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 8, 48, 40))
    image = init_image(64, 64, 9)
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=mask, strength=strength, num_inference_steps=6,
        guidance_scale=5.0, width=64, height=64, generator=generators(3, 1), output_type="np",
    ).images  # fmt: skip
    result = ours.generate(
        prompt=PROMPT, negative_prompt=NEGATIVE, init_image=image, mask=mask, strength=strength, steps=6,
        guidance=5.0, width=64, height=64, sampler="EulerDiscreteScheduler", seed=3,
    )  # fmt: skip
    check(result, expected, f"sdxl inpaint {channels}-channel strength {strength}")


# --- Turbo --------------------------------------------------------------------------------------------------


def test_sdxl_turbo_defaults_match_diffusers(tmp_path):
    """A Turbo model on its defaults: 1 step of Euler a without guidance (sdxl-turbo's model card:
    `pipe(prompt, num_inference_steps=1, guidance_scale=0.0)`, its scheduler EulerAncestralDiscrete "trailing"),
    at 512x512 (checked, then run at 64x64 to stay fast)."""
    import diffusers

    parts = tiny_components(tmp_path, "sdxl", seed=6)
    folder = tmp_path / "sdxl-turbo-tiny"
    diffusers.StableDiffusionXLPipeline(**parts).save_pretrained(folder)
    info = convert(folder, tmp_path / "mlx", dtype="float32")
    assert info.kind == "turbo" and info.detection["kind"]["confidence"] == "medium"  # from the name
    ours = Pipeline(tmp_path / "mlx")
    defaults = ours.defaults
    assert (defaults.width, defaults.height, defaults.steps, defaults.guidance, defaults.sampler) == (
        512, 512, 1, 0.0, "Euler a")  # fmt: skip
    result = ours.generate(prompt=PROMPT, width=64, height=64, seed=12)
    assert (result.request.steps, result.request.guidance, result.request.sampler) == (1, 0.0, "Euler a")
    turbo = {**saved_config(parts["scheduler"]), "timestep_spacing": "trailing"}
    pipe = diffusers.StableDiffusionXLPipeline(
        **{**parts, "scheduler": diffusers.EulerAncestralDiscreteScheduler.from_config(turbo)}
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, width=64, height=64, generator=generators(12, 1),
        output_type="np",
    )  # fmt: skip
    check(result, expected.images, "sdxl-turbo defaults")


def test_sd_turbo_defaults(tmp_path):
    """SD-Turbo: SD 2.1's architecture, epsilon, 512x512, 1 step, no guidance."""
    parts = tiny_components(tmp_path, "sd1", seed=7)
    ours = Pipeline(mlx_folder(parts, tmp_path / "mlx", "sd2", kind="turbo"))
    defaults = ours.defaults
    assert (defaults.width, defaults.height, defaults.steps, defaults.guidance, defaults.sampler) == (
        512, 512, 1, 0.0, "Euler a")  # fmt: skip
    result = ours.generate(prompt=PROMPT, width=64, height=64, seed=1)
    assert "Steps: 1" in result.infotexts[0] and "CFG scale: 0.0" in result.infotexts[0]


@pytest.mark.parametrize(
    "family,prediction,kind,expected",
    [
        ("sdxl", "epsilon", "", (1024, 1024, 20, 7.0, "DPM++ 2M")),
        ("sdxl-refiner", "epsilon", "", (1024, 1024, 20, 7.0, "DPM++ 2M")),
        ("sdxl", "epsilon", "turbo", (512, 512, 1, 0.0, "Euler a")),
        ("sd2", "epsilon", "turbo", (512, 512, 1, 0.0, "Euler a")),
    ],
)
def test_family_defaults(family, prediction, kind, expected):
    from mlx_sd.params import defaults_for

    d = defaults_for(family, prediction, kind)
    assert (d.width, d.height, d.steps, d.guidance, d.sampler) == expected
