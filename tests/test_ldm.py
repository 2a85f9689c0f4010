"""Original single-file checkpoints (CompVis/Stability `ldm` layout) -> mlx_sd, proved against the original code.

Fixtures (tests/ldm_fixtures.py) are tiny random checkpoints made by the ORIGINAL `ldm` code in the genuine
single-file layout. We convert them with our maps, load strictly, and compare outputs with what the original
modules compute (fp32, max|ours - ref| / max|ref| <= 1e-4). Independently, diffusers' single-file loaders read the
same files and must give bit-identical weights. At the published sizes, every tensor of a full-size SD1.5 / SD2.1
file (built on the meta device) must map strictly onto the published configs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ldm_fixtures import (
    FAMILY,
    TEXT_WIDTH,
    check_text,
    check_unet,
    check_vae,
    convert_all,
    full_size_file,
    original,
)

from mlx_sd_convert.diffusers import clip_config, unet_config, vae_config
from mlx_sd_convert.families import family_config
from mlx_sd_convert.keymap import ConversionError, to_mlx_layout
from mlx_sd_convert.ldm import plan_single_file, plan_vae_file
from mlx_sd_convert.ldm_detect import HIGH, OVERRIDE

CASES = [("sd1", False), ("sd1", True), ("sd2", False), ("sd2", True), ("inpaint", False), ("pix2pix", False)]


@pytest.mark.parametrize("kind,ema", CASES, ids=[f"{k}{'-ema' if e else ''}" for k, e in CASES])
def test_single_file_matches_original_code(kind, ema):
    orig = original(kind, ema)
    plan, converted = convert_all(orig.state)
    assert plan.detection.family.value == FAMILY[kind]
    assert plan.detection.ema.value is ema
    errs = {"unet": check_unet(orig, *converted["unet"])}
    if kind in ("sd1", "sd2") and not ema:  # the same autoencoder in every fixture; one text tower per family
        errs["text"] = check_text(orig, *converted["text_encoder"])
    if kind == "sd1" and not ema:
        errs.update({f"vae {k}": v for k, v in check_vae(orig, *converted["vae"]).items()})
    print(f"{kind}{' ema' if ema else ''}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


def test_no_ema_option_takes_the_raw_weights():
    orig = original("sd1", ema=True)
    plan, converted = convert_all(orig.state, use_ema=False)
    assert plan.detection.ema.value is False and plan.detection.ema.confidence == OVERRIDE
    raw = copy.copy(orig)
    raw.unet = orig.raw_unet
    check_unet(raw, *converted["unet"])
    with pytest.raises(AssertionError):  # and they differ from the EMA weights
        check_unet(orig, *converted["unet"])


def test_separately_published_vae_file():
    """--vae files (vae-ft-mse-840000 and the like) store the autoencoder without the first_stage_model. prefix."""
    orig = original("sd1")
    _, converted = convert_all(orig.state)
    prefix = "first_stage_model."
    bare = {k[len(prefix) :]: v for k, v in orig.state.items() if k.startswith(prefix)}
    bare["loss.logvar"] = np.zeros((), np.float32)  # training state some VAE files carry
    weights = plan_vae_file(bare).convert()
    assert weights.keys() == converted["vae"][1].keys()
    assert all(np.array_equal(v, converted["vae"][1][k]) for k, v in weights.items())
    with pytest.raises(ConversionError, match=r"vae: .*match no rule \(stray\.weight\)"):
        plan_vae_file({**bare, "stray.weight": np.zeros(3)}).convert()


def test_text_encoder_without_text_model_prefix():
    """Some SD1 files store cond_stage_model.transformer.* without `text_model.` (as transformers >= 5.6 does)."""
    orig = original("sd1")
    prefix = "cond_stage_model.transformer."
    flat = {k.replace(f"{prefix}text_model.", prefix): v for k, v in orig.state.items()}
    assert f"{prefix}embeddings.token_embedding.weight" in flat
    _, converted = convert_all(flat)
    check_text(orig, *converted["text_encoder"])


# --- an independent second opinion: diffusers' own single-file conversion -----------------------------------


@pytest.mark.parametrize("kind,ema", [("sd1", True), ("sd2", False), ("inpaint", False)])
def test_weights_equal_diffusers_from_single_file(kind, ema, tmp_path):
    import yaml
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    orig = original(kind, ema)
    path, config_path = tmp_path / "model.safetensors", tmp_path / "original.yaml"
    save_file({k: torch.from_numpy(v) for k, v in orig.state.items()}, str(path))
    config_path.write_text(yaml.safe_dump(orig.yaml))
    _, converted = convert_all(orig.state)
    theirs = {
        "unet": UNet2DConditionModel.from_single_file(str(path), original_config=str(config_path), extract_ema=ema),
        "vae": AutoencoderKL.from_single_file(str(path), original_config=str(config_path)),
    }
    for name, model in theirs.items():
        ours = converted[name][1]
        reference = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        assert set(ours) == set(reference), f"{name}: parameter names differ: {set(ours) ^ set(reference)}"
        for key, value in ours.items():
            expected = to_mlx_layout(reference[key], value.shape)
            assert np.array_equal(value, expected), f"{name} {key} differs from diffusers' conversion"
    # and diffusers read the same configuration from the yaml as we read from the shapes
    assert converted["unet"][0] == unet_config(dict(theirs["unet"].config))
    assert converted["vae"][0] == vae_config(dict(theirs["vae"].config))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_text_encoder_weights_equal_diffusers(kind, tmp_path):
    """diffusers' single-file CLIP loader (what StableDiffusionPipeline.from_single_file runs), offline with a
    local transformers config for the tiny tower; SD2's keeps all but the last block, as SD2 conditions on it."""
    import json

    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    orig = original(kind)
    if kind == "sd1":
        config = orig.cond.transformer.config.to_dict()
    else:
        config = dict(
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=2,  # of the tower's 3 blocks
            num_attention_heads=2,
            hidden_act="gelu",
            vocab_size=49408,
            max_position_embeddings=77,
        )
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps(config))
    checkpoint = {k: torch.from_numpy(v) for k, v in orig.state.items()}
    theirs = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, subfolder="text_encoder", config=str(tmp_path), local_files_only=True
    )
    reference = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    _, converted = convert_all(orig.state)
    ours = converted["text_encoder"][1]
    assert set(ours) == set(reference)
    assert all(np.array_equal(v, reference[k]) for k, v in ours.items())


# --- the published sizes: every tensor of a full-size file mapped strictly (shapes only, no memory) ----------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_files_map_strictly_onto_the_published_configs(family):
    plan = plan_single_file(full_size_file(family))
    assert (plan.detection.family.value, plan.detection.family.confidence) == (family, HIGH)
    assert plan.detection.ema.value is True
    published = {
        "unet": unet_config(family_config(family, "unet")),
        "vae": vae_config(family_config(family, "vae")),
        "text_encoder": clip_config(family_config(family, "text_encoder"), with_projection=False),
    }
    for name, component in plan.components.items():
        assert component.config == published[name], name
        weights = component.convert()  # strict: every tensor mapped or dropped, every parameter filled
        print(f"{family} {name}: {len(weights)} parameters, {sum(v.size for v in weights.values()):,} values")


def test_sd2_text_tower_saved_without_its_last_block():
    """A ViT-H tower saved with 23 blocks was already cut to what SD2 uses: keep all of them."""
    state = {k: v for k, v in full_size_file("sd2").items() if ".resblocks.23." not in k}
    text = plan_single_file(state).components["text_encoder"]
    assert text.config == clip_config(family_config("sd2", "text_encoder"), with_projection=False)
    text.convert()
