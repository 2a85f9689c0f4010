"""SDXL conversion: diffusers folders and original (sgm) single files, base and refiner, against the references.

1. The fixture writer is proved first: diffusers' own `from_single_file` reads the written original-layout files
   back into weights identical to the diffusers models they were written from (tests/sgm_fixtures.py).
2. The same model as a single file and as a diffusers folder converts to byte-identical components, with the
   manifest flags the diffusers pipelines use (force_zeros_for_empty_prompt, requires_aesthetics_score).
3. Models converted from the single files generate diffusers' images (base -> refiner hand-off).
4. Per component: the bigG tower read from the original layout against open_clip running sgm's
   FrozenOpenCLIPEmbedder2 rule (penultimate states, projected pooled output); the UNet's added text-time
   embedding against diffusers; tokenizer 2 pads with 0 (open_clip, transformers with pad "!"), tokenizer 1 with eos.
5. The kind rule (Turbo), a separately published VAE, and the errors.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from ldm_fixtures import original
from sgm_fixtures import (
    BIG_G,
    SDXL_SCALING,
    diffusers_parts,
    from_single_file,
    sgm_state,
    write_diffusers_folder,
    write_single_file,
)
from test_pipeline import MIN_PSNR, as_array, generators, saved_config

from mlx_sd.components import load_component
from mlx_sd.model import StableDiffusion
from mlx_sd.pipeline import Pipeline
from mlx_sd.tokenizer import EOS_ID
from mlx_sd_convert import ConversionError, convert
from mlx_sd_convert.ldm import plan_single_file
from oracles import assert_close, open_clip_module, psnr, state_dict_numpy

KINDS = ("base", "refiner")
COMPONENTS = {"base": ("unet", "vae", "text_encoder", "text_encoder_2"), "refiner": ("unet", "vae", "text_encoder_2")}
TOL = 1e-4


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per kind: the diffusers folder and the original single file of the same tiny model."""
    tmp = tmp_path_factory.mktemp("sdxl-sources")
    folder = {kind: write_diffusers_folder(tmp / f"{kind}-folder", kind) for kind in KINDS}
    return {kind: (folder[kind], write_single_file(tmp / f"sd_xl_{kind}.safetensors", kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-converted")
    out = {}
    for kind, (folder, single) in sources.items():
        out[kind] = {
            "folder": (convert(folder, tmp / f"{kind}-from-folder", dtype="float32"), tmp / f"{kind}-from-folder"),
            "file": (convert(single, tmp / f"{kind}-from-file", dtype="float32"), tmp / f"{kind}-from-file"),
        }
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_writer_is_read_back_identically_by_diffusers(sources, kind):
    folder, single = sources[kind]
    pipe = from_single_file(single, kind, folder)
    parts = diffusers_parts(kind)
    for name in COMPONENTS[kind]:
        expected, got = parts[name].state_dict(), getattr(pipe, name).state_dict()
        assert expected.keys() == got.keys(), name
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f"{name}: {different[:5]}"
    assert kind == "base" or pipe.text_encoder is None


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_and_folder_convert_to_the_same_model(converted, kind):
    (from_folder, folder), (from_file, file) = converted[kind]["folder"], converted[kind]["file"]
    for component in COMPONENTS[kind]:
        for name in ("weights.safetensors", "config.json"):
            assert (folder / component / name).read_bytes() == (file / component / name).read_bytes(), component
    assert not (file / "text_encoder").exists() if kind == "refiner" else True
    family = "sdxl" if kind == "base" else "sdxl-refiner"
    for info in (from_folder, from_file):
        assert info.family == family and info.prediction_type == "epsilon" and info.kind == ""
        assert info.force_zeros_for_empty_prompt is (kind == "base")
        assert info.requires_aesthetics_score is (kind == "refiner")
    # From model_index.json (the base pipeline has no aesthetic flag: inferred from the UNet's added embedding).
    assert from_folder.detection["force_zeros_for_empty_prompt"]["confidence"] == "certain"
    expected = "certain" if kind == "refiner" else "high"
    assert from_folder.detection["requires_aesthetics_score"]["confidence"] == expected
    assert json.loads((file / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "EulerDiscreteScheduler")  # fmt: skip
    assert load_component(file / "vae").config.scaling_factor == SDXL_SCALING  # the sgm yaml's, not in the file


def test_models_from_single_files_generate_diffusers_images(converted):
    """Base and refiner converted from original single files, handing off as diffusers' two pipelines do."""
    import diffusers
    from sgm_fixtures import diffusers_pipeline

    base = StableDiffusion(converted["base"]["file"][1])
    refiner = StableDiffusion(converted["refiner"]["file"][1])
    pipes = {}
    for kind in KINDS:
        pipes[kind] = diffusers_pipeline(kind)
        config = saved_config(diffusers_parts(kind)["scheduler"])
        pipes[kind].scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(config)
        pipes[kind].set_progress_bar_config(disable=True)
    generator = generators(3, 1)
    common = dict(prompt="a castle on a hill", negative_prompt="fog", num_inference_steps=5, guidance_scale=6.0)
    latents = pipes["base"](**common, width=64, height=64, denoising_end=0.6, generator=generator,
                            output_type="latent").images  # fmt: skip
    expected = pipes["refiner"](**common, image=latents, denoising_start=0.6, generator=generator, output_type="np")
    result = Pipeline(base, refiner=refiner).generate(
        prompt="a castle on a hill", negative_prompt="fog", steps=5, guidance=6.0, width=64, height=64, seed=3,
        sampler="EulerAncestralDiscreteScheduler", refiner_switch_at=0.6,
    )  # fmt: skip
    value = psnr(as_array(result.images), expected.images, data_range=1.0)
    print(f"single-file base -> refiner: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR


@pytest.mark.parametrize("kind", KINDS)
def test_full_size_files_map_strictly_onto_the_published_configs(kind):
    """Every tensor of a full-size sd_xl_base_1.0 / sd_xl_refiner_1.0 layout (meta-device stand-ins) maps, and the
    configs inferred from shapes are the published diffusers configs."""
    from sgm_fixtures import full_size_file

    from mlx_sd_convert.diffusers import clip_config, unet_config, vae_config
    from mlx_sd_convert.families import family_config

    family = "sdxl" if kind == "base" else "sdxl-refiner"
    plan = plan_single_file(full_size_file(kind))
    assert plan.detection.family.value == family
    published = {
        "unet": unet_config(family_config(family, "unet")),
        "vae": vae_config(family_config(family, "vae")),
        "text_encoder_2": clip_config(family_config(family, "text_encoder_2"), with_projection=True),
    }
    if kind == "base":
        published["text_encoder"] = clip_config(family_config(family, "text_encoder"), with_projection=False)
    assert plan.components.keys() == published.keys()
    for name, component in plan.components.items():
        assert component.config == published[name], name
        mapped = component.keymap()  # strict: every tensor mapped or dropped, every parameter filled
        print(f"{family} {name}: {len(mapped)} parameters")


# --- per component ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_big_g_from_the_original_layout_matches_open_clip(converted, kind):
    """sgm's FrozenOpenCLIPEmbedder2 (layer="penultimate", always_return_pooled, legacy=False) on open_clip's
    TextTransformer holding the file's tensors: z = the penultimate block's output (no ln_final), pooled =
    ln_final(last block)[argmax(ids)] @ text_projection. Ours reads hidden_states[-2] and text_embeds."""
    prefix = "conditioner.embedders.1.model." if kind == "base" else "conditioner.embedders.0.model."
    state = {k[len(prefix) :]: torch.from_numpy(v) for k, v in sgm_state(kind).items() if k.startswith(prefix)}
    state.pop("logit_scale")
    TextTransformer = open_clip_module("transformer").TextTransformer
    tower = TextTransformer(
        context_length=77, vocab_size=49408, width=BIG_G["hidden_size"], heads=BIG_G["num_attention_heads"],
        layers=BIG_G["num_hidden_layers"], output_dim=BIG_G["projection_dim"], act_layer=torch.nn.GELU,
        mlp_ratio=BIG_G["intermediate_size"] / BIG_G["hidden_size"],
    )  # fmt: skip
    tower.load_state_dict(state, strict=True)
    ids = torch.from_numpy(np.array([[49406, 320, 1125, 539, 49407] + [0] * 72, [49406, 1929, 49407] + [0] * 74]))
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=tower.attn_mask)
        penultimate = x
        last = tower.ln_final(tower.transformer.resblocks[-1](x, attn_mask=tower.attn_mask))
        pooled = last[torch.arange(2), ids.argmax(dim=-1)] @ tower.text_projection
    ours = load_component(converted[kind]["file"][1] / "text_encoder_2")
    out = ours(mx.array(ids.numpy()))
    e_states = assert_close(out.hidden_states[-2], penultimate, TOL, "bigG penultimate")
    e_pooled = assert_close(out.text_embeds, pooled, TOL, "bigG projected pooled")
    print(f"bigG {kind} from the original layout: penultimate {e_states:.1e}, projected pooled {e_pooled:.1e}")


@pytest.mark.parametrize("kind", KINDS)
def test_added_text_time_embedding_matches_diffusers(converted, kind):
    """The UNet's added embedding: diffusers' add_time_proj (sinusoidal, per number) concatenated to the pooled
    text, through add_embedding; the refiner's 5 numbers end with the aesthetic score."""
    ref = diffusers_parts(kind)["unet"]
    ours = load_component(converted[kind]["file"][1] / "unet")
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(2, BIG_G["projection_dim"], generator=g)
    numbers = [[1024, 768, 0, 32, 1024, 1024], [512, 512, 16, 8, 896, 1152]]
    time_ids = torch.tensor([row[:5] if kind == "refiner" else row for row in numbers], dtype=torch.float32)
    with torch.no_grad():
        time_embeds = ref.add_time_proj(time_ids.flatten()).reshape(2, -1)
        expected = ref.add_embedding(torch.cat([pooled, time_embeds], dim=-1))
    from mlx_sd.models.layers import timestep_embedding

    cfg = ours.config
    emb = timestep_embedding(mx.array(time_ids.numpy()).reshape(-1), cfg.addition_time_embed_dim,
                             cfg.flip_sin_to_cos, cfg.freq_shift).reshape(2, -1)  # fmt: skip
    got = ours.add_embedding(mx.concatenate([mx.array(pooled.numpy()), emb], axis=-1))
    print(f"added embedding {kind}: {assert_close(got, expected, TOL, 'add_embedding'):.1e}")


def test_tokenizer_padding(converted, sources):
    """Tokenizer 1 (CLIP-L) pads with eos, tokenizer 2 (bigG) with 0: the diffusers folder's tokenizers, and open_clip
    (which the original SDXL code tokenizes bigG prompts with). Single files get the same pads. A literal "!" stays
    BPE token 256 as in open_clip (transformers with pad "!" makes it 0: see tests/test_tokenizer.py)."""
    from transformers import CLIPTokenizer as HFTokenizer

    prompt, exclaimed = "a photo of a cat, highly detailed", "a cat! a dog!"
    folder = sources["base"][0]
    simple = open_clip_module("tokenizer").SimpleTokenizer()
    for source in ("folder", "file"):
        model = StableDiffusion(converted["base"][source][1])
        tok1, tok2 = (tower.tokenizer for tower in model.text_encoder().towers)
        assert (tok1.pad_token_id, tok2.pad_token_id) == (EOS_ID, 0)
        ids1, ids2 = tok1(prompt).ids[0], tok2(prompt).ids[0]
        hf1 = HFTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77)
        hf2 = HFTokenizer.from_pretrained(folder / "tokenizer_2", model_max_length=77)
        assert ids1.tolist() == hf1(prompt, padding="max_length", max_length=77).input_ids
        assert ids2.tolist() == hf2(prompt, padding="max_length", max_length=77).input_ids
        assert ids2.tolist() == simple(prompt, context_length=77)[0].tolist()
        assert tok2(exclaimed).ids[0].tolist() == simple(exclaimed, context_length=77)[0].tolist()
        assert ids1[-1] == EOS_ID and ids2[-1] == 0
    refiner = StableDiffusion(converted["refiner"]["file"][1])
    assert [t.tokenizer.pad_token_id for t in refiner.text_encoder().towers] == [0]


# --- kind, VAE, errors ------------------------------------------------------------------------------------


def test_turbo_kind_from_the_name_metadata_or_override(sources, tmp_path):
    _, single = sources["base"]
    named = tmp_path / "sd_xl_turbo_1.0_fp16.safetensors"
    named.symlink_to(single)
    info = convert(named, tmp_path / "by-name", dtype="float16")
    assert info.kind == "turbo" and info.detection["kind"]["confidence"] == "medium"
    scheduler = json.loads((tmp_path / "by-name" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["timestep_spacing"]) == ("EulerAncestralDiscreteScheduler", "trailing")
    spec = write_single_file(tmp_path / "model.safetensors", "base", metadata={"modelspec.title": "SDXL Turbo"})
    assert convert(spec, tmp_path / "by-metadata").detection["kind"]["confidence"] == "high"
    assert convert(named, tmp_path / "override", kind="standard").kind == ""
    plain = convert(single, tmp_path / "plain")
    assert plain.kind == "" and plain.detection["kind"]["confidence"] == "low"
    assert "--kind turbo" in plain.detection["kind"]["evidence"]


def test_sd_turbo_file_saved_by_sgm(tmp_path):
    """SD-Turbo: SD 2.1's architecture saved by Stability's sgm code (conditioner.embedders.0.model.*, the
    denoiser's sigma table): kind turbo, epsilon (sd_2_1.yaml: EpsScaling), defaults 1 step at 512 x 512."""
    from convert_fixtures import save_single_file

    state = {
        k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v
        for k, v in original("sd2").state.items()
    }
    state["denoiser.sigmas"] = np.linspace(0.03, 14.6, 1000, dtype=np.float32)
    info = convert(save_single_file(tmp_path / "model.safetensors", state), tmp_path / "out")
    assert (info.family, info.kind, info.prediction_type) == ("sd2", "turbo", "epsilon")
    assert "sgm" in info.detection["kind"]["evidence"] and "EpsScaling" in info.detection["prediction_type"]["evidence"]
    defaults = Pipeline(tmp_path / "out").defaults
    assert (defaults.width, defaults.steps, defaults.guidance) == (512, 1, 0.0)


def test_separately_published_vae_for_sdxl(sources, tmp_path):
    """--vae with an SDXL model: an original-layout VAE file keeps SDXL's latent scale (the file has none); a
    diffusers VAE folder (as madebyollin/sdxl-vae-fp16-fix) brings its own config."""
    from diffusers import AutoencoderKL
    from sgm_fixtures import TINY_VAE

    from oracles import randomize

    _, single = sources["base"]
    torch.manual_seed(9)
    other = randomize(AutoencoderKL(**{**TINY_VAE, "force_upcast": False}), 9)
    other.save_pretrained(tmp_path / "vae-fp16-fix")
    parts = {**diffusers_parts("base"), "vae": other}
    prefix = "first_stage_model."
    bare = {k[len(prefix) :]: v for k, v in sgm_state("base", parts).items() if k.startswith(prefix)}
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in bare.items()}, str(tmp_path / "sdxl_vae.safetensors"))
    expected = {k: np.asarray(v) for k, v in state_dict_numpy(other).items()}
    for source in ("sdxl_vae.safetensors", "vae-fp16-fix"):
        out = tmp_path / f"model-with-{source}"
        info = convert(single, out, vae=tmp_path / source, dtype="float32")
        vae = load_component(out / "vae")
        assert vae.config.scaling_factor == SDXL_SCALING, source
        weight = np.array(vae.decoder.conv_out.weight)
        assert np.array_equal(weight, expected["decoder.conv_out.weight"].transpose(0, 2, 3, 1)), source
        assert info.detection["vae"]["value"] in source


def test_sdxl_errors(sources, tmp_path):
    folder, single = sources["refiner"]
    state = sgm_state("base")
    with pytest.raises(ConversionError, match="family sd1 expects cond_stage_model.transformer"):
        plan_single_file(state, family="sd1")
    incomplete = {k: v for k, v in state.items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ConversionError, match="SDXL base file is incomplete"):
        plan_single_file(incomplete)
    broken = tmp_path / "refiner"
    import shutil

    shutil.copytree(folder, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": False}))
    with pytest.raises(ConversionError, match="requires_aesthetics_score=false but the UNet.*5 micro-conditioning"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
