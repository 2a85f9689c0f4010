"""Original single-file checkpoints (CompVis/Stability `ldm` layout) -> mlx_sd, proved against the original code.

Fixtures are built at test time by the ORIGINAL code (stable-diffusion-sdkit's `ldm`): tiny UNetModel, Encoder and
Decoder, and the text towers ldm wraps (transformers' CLIPTextModel for SD1, an open_clip CLIP for SD2), every
parameter randomised, assembled under the attribute names of ldm's LatentDiffusion (which itself needs
pytorch_lightning), so their state dicts have the genuine single-file layout. We convert with our maps, load
strictly, and compare outputs with what the original code computes. Independently, diffusers' `from_single_file`
loads the same file and must give bit-identical weights.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd_convert.diffusers import clip_config, unet_config, vae_config
from mlx_sd_convert.families import family_config
from mlx_sd_convert.keymap import ConversionError, to_mlx_layout
from mlx_sd_convert.ldm import plan_single_file
from mlx_sd_convert.ldm_detect import CERTAIN, EPSILON, HIGH, LOW, MEDIUM, OVERRIDE, V_PREDICTION, detect
from oracles import assert_close, ldm_module, load_ours, nchw_to_nhwc, open_clip_module, randomize, token_batch

FP32_TOL = 1e-4

# Tiny architectures in the original yaml vocabulary (v1-inference.yaml / v2-inference.yaml `unet_config.params`).
# Channel counts are multiples of 32 (ldm hard-codes GroupNorm(32)); SD2's are multiples of its 64-wide heads.
TEXT_WIDTH = 128
TINY_UNETS = {
    "sd1": dict(
        in_channels=4,
        model_channels=32,
        channel_mult=[1, 2, 2],
        num_res_blocks=2,
        attention_resolutions=[1, 2],
        num_heads=8,
        transformer_depth=1,
        use_linear_in_transformer=False,
    ),
    "sd2": dict(
        in_channels=4,
        model_channels=64,
        channel_mult=[1, 2, 2],
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        num_head_channels=64,
        transformer_depth=1,  # ldm's SpatialTransformer cannot build depth > 1 with one context width
        use_linear_in_transformer=True,
    ),
    # SD1.5-inpainting layout: latents + mask + masked-image latents.
    "inpaint": dict(
        in_channels=9,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        num_heads=8,
        transformer_depth=1,
        use_linear_in_transformer=False,
    ),
}
FAMILY = {"sd1": "sd1", "sd2": "sd2", "inpaint": "sd1"}
TINY_VAE = dict(
    double_z=True,
    z_channels=4,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)
EMBED_DIM = 4
# ldm's DDPM.register_schedule buffers, as every original checkpoint carries them.
SCHEDULE_BUFFERS = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]


class Holder(torch.nn.Module):
    """Stands in for ldm's LatentDiffusion / DiffusionWrapper / AutoencoderKL (which need pytorch_lightning):
    the same attribute names give the same state-dict keys."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


@dataclass
class Original:
    kind: str
    unet: torch.nn.Module  # the weights the converter should pick (the EMA copy when there is one)
    raw_unet: torch.nn.Module
    first_stage: Holder
    cond: torch.nn.Module
    state: dict[str, np.ndarray]
    yaml: dict


def _unet_params(kind: str) -> dict:
    return dict(
        image_size=8,
        out_channels=4,
        use_spatial_transformer=True,
        context_dim=TEXT_WIDTH,
        legacy=False,
        **TINY_UNETS[kind],
    )


def _sd1_text(seed: int) -> torch.nn.Module:
    """ldm's FrozenCLIPEmbedder around a tiny CLIPTextModel (its __init__ would download the real one)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    encoders = ldm_module("modules.encoders.modules")
    cond = encoders.FrozenCLIPEmbedder.__new__(encoders.FrozenCLIPEmbedder)
    torch.nn.Module.__init__(cond)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=TEXT_WIDTH,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=TEXT_WIDTH // 64,
        hidden_act="quick_gelu",
        vocab_size=49408,
        max_position_embeddings=77,
    )
    cond.transformer = randomize(CLIPTextModel(config), seed)
    cond.layer = "last"
    return cond


def _sd2_text(seed: int) -> torch.nn.Module:
    """ldm's FrozenOpenCLIPEmbedder around a tiny open_clip CLIP with the image tower deleted, as ldm does.

    open_clip 3.x runs its text blocks batch-first; SD2's ldm code (open_clip 2.0) feeds them (L, N, D), so the
    blocks are rebuilt sequence-first with the same weights (the layout on disk is unchanged).
    """
    model_mod, transformer_mod = open_clip_module("model"), open_clip_module("transformer")
    encoders = ldm_module("modules.encoders.modules")
    torch.manual_seed(seed)
    clip = model_mod.CLIP(
        embed_dim=64,
        vision_cfg=model_mod.CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=8, image_size=16),
        text_cfg=model_mod.CLIPTextCfg(context_length=77, vocab_size=49408, width=TEXT_WIDTH, heads=2, layers=3),
    )
    del clip.visual
    randomize(clip, seed)
    blocks = transformer_mod.Transformer(TEXT_WIDTH, 3, 2, act_layer=torch.nn.GELU, batch_first=False)
    blocks.load_state_dict(clip.transformer.state_dict())
    clip.transformer = blocks.eval()
    cond = encoders.FrozenOpenCLIPEmbedder.__new__(encoders.FrozenOpenCLIPEmbedder)
    torch.nn.Module.__init__(cond)
    cond.model, cond.layer, cond.layer_idx = clip, "penultimate", 1
    return cond


@functools.cache
def original(kind: str, ema: bool = False, seed: int = 0) -> Original:
    """A tiny random SD checkpoint made by the original code, in the original single-file layout."""
    if ema:
        return _with_ema(original(kind, False, seed), seed + 3)
    openaimodel = ldm_module("modules.diffusionmodules.openaimodel")
    model = ldm_module("modules.diffusionmodules.model")
    torch.manual_seed(seed)
    unet = randomize(openaimodel.UNetModel(**_unet_params(kind)), seed)
    torch.manual_seed(seed + 1)
    first_stage = randomize(
        Holder(
            encoder=model.Encoder(**TINY_VAE),
            decoder=model.Decoder(**TINY_VAE),
            quant_conv=torch.nn.Conv2d(2 * TINY_VAE["z_channels"], 2 * EMBED_DIM, 1),
            post_quant_conv=torch.nn.Conv2d(EMBED_DIM, TINY_VAE["z_channels"], 1),
        ),
        seed + 1,
    )
    cond = _sd2_text(seed + 2) if FAMILY[kind] == "sd2" else _sd1_text(seed + 2)
    ldm = Holder(model=Holder(diffusion_model=unet), first_stage_model=first_stage, cond_stage_model=cond)
    betas = ldm_module("modules.diffusionmodules.util").make_beta_schedule("linear", 1000, 0.00085, 0.012)
    for name in SCHEDULE_BUFFERS:
        ldm.register_buffer(name, torch.as_tensor(betas, dtype=torch.float32))  # the names are what matters
    state = _numpy(ldm)
    if FAMILY[kind] == "sd1":
        state = _with_text_model_prefix(state)
    yaml = {
        "model": {
            "params": {
                "scale_factor": 0.18215,
                "unet_config": {"params": _unet_params(kind)},
                "first_stage_config": {"params": {"embed_dim": EMBED_DIM, "ddconfig": TINY_VAE}},
            }
        }
    }
    return Original(kind, unet, unet, first_stage, cond, state, yaml)


def _with_ema(base: Original, seed: int) -> Original:
    """The same checkpoint as trained with use_ema: ldm's LitEma shadows `model` (a DiffusionWrapper) by
    parameter name. The shadow gets its own random values so a test can tell which copy was converted."""
    ema_unet = randomize(copy.deepcopy(base.raw_unet), seed)
    shadow = ldm_module("modules.ema").LitEma(Holder(diffusion_model=ema_unet))
    state = {**base.state, **{f"model_ema.{k}": v for k, v in _numpy(shadow).items()}}
    return Original(base.kind, ema_unet, base.raw_unet, base.first_stage, base.cond, state, base.yaml)


def _numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _with_text_model_prefix(state: dict) -> dict:
    """Published SD1 files were saved with transformers 4.x: `cond_stage_model.transformer.text_model.*` plus the
    int64 position_ids buffer. transformers >= 5.6 (here) drops both; put them back."""
    prefix = "cond_stage_model.transformer."
    out = {(f"{prefix}text_model.{k[len(prefix) :]}" if k.startswith(prefix) else k): v for k, v in state.items()}
    out[f"{prefix}text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def _convert(state, **options):
    plan = plan_single_file(state, **options)
    return plan, {name: (c.config, c.convert()) for name, c in plan.components.items()}


# --- parity with the original code --------------------------------------------------------------------------


def _check_unet(orig: Original, config, weights, seed=0) -> float:
    ours = load_ours(config, weights)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, 12, 8, generator=g)
    t = torch.tensor([999.0, 17.5])
    context = torch.randn(2, 7, TEXT_WIDTH, generator=g)
    with torch.no_grad():
        expected = orig.unet(x, timesteps=t, context=context)
    got = ours(nchw_to_nhwc(x), mx.array(t.numpy()), mx.array(context.numpy()))
    return assert_close(got, nchw_to_nhwc(expected), FP32_TOL, f"{orig.kind} unet")


def _check_vae(orig: Original, config, weights) -> dict[str, float]:
    """As ldm's AutoencoderKL: encode = Gaussian(quant_conv(encoder(x))), decode = decoder(post_quant_conv(z))."""
    Gaussian = ldm_module("modules.distributions.distributions").DiagonalGaussianDistribution
    ours = load_ours(config, weights)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 32, 24, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 6, generator=g)
    fs = orig.first_stage
    with torch.no_grad():
        dist = Gaussian(fs.quant_conv(fs.encoder(image)))
        decoded = fs.decoder(fs.post_quant_conv(z))
    got = ours.encode(nchw_to_nhwc(image))
    return {
        "mean": assert_close(got.mean, nchw_to_nhwc(dist.mean), FP32_TOL, "vae mean"),
        "logvar": assert_close(got.logvar, nchw_to_nhwc(dist.logvar), FP32_TOL, "vae logvar"),
        "decode": assert_close(ours.decode(nchw_to_nhwc(z)), nchw_to_nhwc(decoded), FP32_TOL, "vae decode"),
    }


def _check_text(orig: Original, config, weights) -> float:
    """What ldm's conditioning stage returns for token ids (after its tokenizer)."""
    ours = load_ours(config, weights)
    pad = 0 if FAMILY[orig.kind] == "sd2" else 49407
    ids = token_batch(pad)
    with torch.no_grad():
        if FAMILY[orig.kind] == "sd2":
            expected = orig.cond.encode_with_transformer(torch.from_numpy(ids))  # layer="penultimate"
        else:
            expected = orig.cond.transformer(input_ids=torch.from_numpy(ids)).last_hidden_state  # layer="last"
    return assert_close(ours(mx.array(ids)).last_hidden_state, expected, FP32_TOL, f"{orig.kind} text")


CASES = [("sd1", False), ("sd1", True), ("sd2", False), ("sd2", True), ("inpaint", False)]


@pytest.mark.parametrize("kind,ema", CASES, ids=[f"{k}{'-ema' if e else ''}" for k, e in CASES])
def test_single_file_matches_original_code(kind, ema):
    orig = original(kind, ema)
    plan, converted = _convert(orig.state)
    assert plan.detection.family.value == FAMILY[kind]
    assert plan.detection.ema.value is ema
    errs = {"unet": _check_unet(orig, *converted["unet"])}
    if kind != "inpaint" and not ema:  # the same autoencoder in every fixture; one text tower per family
        errs["text"] = _check_text(orig, *converted["text_encoder"])
    if kind == "sd1" and not ema:
        errs.update({f"vae {k}": v for k, v in _check_vae(orig, *converted["vae"]).items()})
    print(f"{kind}{' ema' if ema else ''}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


def test_no_ema_option_takes_the_raw_weights():
    orig = original("sd1", ema=True)
    plan, converted = _convert(orig.state, use_ema=False)
    assert plan.detection.ema.value is False and plan.detection.ema.confidence == OVERRIDE
    raw = copy.copy(orig)
    raw.unet = orig.raw_unet
    _check_unet(raw, *converted["unet"])
    with pytest.raises(AssertionError):  # and they differ from the EMA weights
        _check_unet(orig, *converted["unet"])


def test_text_encoder_without_text_model_prefix():
    """Some SD1 files store cond_stage_model.transformer.* without `text_model.` (as transformers >= 5.6 does)."""
    orig = original("sd1")
    prefix = "cond_stage_model.transformer."
    flat = {k.replace(f"{prefix}text_model.", prefix): v for k, v in orig.state.items()}
    assert f"{prefix}embeddings.token_embedding.weight" in flat
    _, converted = _convert(flat)
    _check_text(orig, *converted["text_encoder"])


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
    _, converted = _convert(orig.state)
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
    _, converted = _convert(orig.state)
    ours = converted["text_encoder"][1]
    assert set(ours) == set(reference)
    assert all(np.array_equal(v, reference[k]) for k, v in ours.items())


# --- the published sizes: every tensor of a full-size file mapped strictly (shapes only, no memory) ----------

FULL_UNETS = {
    # v1-inference.yaml and v2-inference(-v).yaml
    "sd1": dict(num_heads=8, context_dim=768, use_linear_in_transformer=False),
    "sd2": dict(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
}


def _full_size_file(family: str) -> dict[str, np.ndarray]:
    """A full-size original checkpoint with EMA, built on the meta device; every tensor a zero-strided stand-in."""
    from transformers import CLIPTextConfig, CLIPTextModel

    openaimodel = ldm_module("modules.diffusionmodules.openaimodel")
    model = ldm_module("modules.diffusionmodules.model")
    clip_model = open_clip_module("model")
    with torch.device("meta"):
        unet = openaimodel.UNetModel(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=320,
            attention_resolutions=[4, 2, 1],
            num_res_blocks=2,
            channel_mult=[1, 2, 4, 4],
            use_spatial_transformer=True,
            transformer_depth=1,
            legacy=False,
            **FULL_UNETS[family],
        )
        ddconfig = dict(TINY_VAE, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, resolution=256)
        first_stage = Holder(
            encoder=model.Encoder(**ddconfig),
            decoder=model.Decoder(**ddconfig),
            quant_conv=torch.nn.Conv2d(8, 8, 1),
            post_quant_conv=torch.nn.Conv2d(4, 4, 1),
        )
        if family == "sd1":
            cond = Holder(transformer=CLIPTextModel(CLIPTextConfig(**family_config("sd1", "text_encoder"))))
        else:  # OpenCLIP ViT-H/14 (open_clip's ViT-H-14.json text tower), image tower deleted as ldm does
            text_cfg = dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24)
            vision_cfg = dict(layers=1, width=64, head_width=32, patch_size=8, image_size=16)
            cond = Holder(model=clip_model.CLIP(embed_dim=1024, vision_cfg=vision_cfg, text_cfg=text_cfg))
            del cond.model.visual
        wrapper = Holder(diffusion_model=unet)
        ldm = Holder(model=wrapper, first_stage_model=first_stage, cond_stage_model=cond)
        ldm.model_ema = ldm_module("modules.ema").LitEma(wrapper)
    shapes = {k: tuple(v.shape) for k, v in ldm.state_dict().items()}
    shapes.update({name: (1000,) for name in SCHEDULE_BUFFERS})
    state = {k: np.broadcast_to(np.float32(0), shape) for k, shape in shapes.items()}
    return _with_text_model_prefix(state) if family == "sd1" else state


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_files_map_strictly_onto_the_published_configs(family):
    plan = plan_single_file(_full_size_file(family))
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
    state = {k: v for k, v in _full_size_file("sd2").items() if ".resblocks.23." not in k}
    text = plan_single_file(state).components["text_encoder"]
    assert text.config == clip_config(family_config("sd2", "text_encoder"), with_projection=False)
    text.convert()


# --- detection ----------------------------------------------------------------------------------------------


def _detect(state, **options):
    shapes = {k: v.shape for k, v in state.items()}
    dtypes = {k: str(v.dtype) for k, v in state.items()}
    return detect(state, shapes, dtypes, **options)


def test_detection_of_the_fixtures():
    sd1 = _detect(original("sd1").state)
    assert (sd1.family.value, sd1.family.confidence) == ("sd1", HIGH)
    assert sd1.text_encoder.value == "clip"
    assert (sd1.in_channels.value, sd1.in_channels.confidence) == (4, CERTAIN) and not sd1.inpainting
    assert (sd1.ema.value, sd1.dtype.value) == (False, "float32")
    assert (sd1.prediction_type.value, sd1.prediction_type.confidence) == (EPSILON, HIGH)

    inpaint = _detect(original("inpaint").state)
    assert inpaint.inpainting and inpaint.family.value == "sd1"

    sd2 = _detect(original("sd2", ema=True).state)
    assert (sd2.family.value, sd2.text_encoder.value, sd2.ema.value) == ("sd2", "openclip", True)
    # Nothing in a tiny SD2 file tells 512-base from 768-v: diffusers' default, reported as a guess.
    assert (sd2.prediction_type.value, sd2.prediction_type.confidence) == (V_PREDICTION, LOW)
    print(sd2.summary())


def test_detection_of_dtype_and_unet_only_files():
    state = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in original("sd2").state.items()}
    unet_only = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    found = _detect(unet_only)
    assert found.dtype.value == "float16"
    assert found.text_encoder.value is None
    assert (found.family.value, found.family.confidence) == ("sd2", MEDIUM)  # the linear projections alone
    plan, converted = _convert(unet_only)
    assert set(plan.components) == {"unet"}
    assert converted["unet"][1]["conv_in.weight"].dtype == np.float16


def test_prediction_type_evidence():
    state = dict(original("sd2").state)
    assert _detect({**state, "v_pred": np.zeros(0)}).prediction_type.confidence == HIGH
    marked = _detect({**state, "v_pred": np.zeros(0)}, family=None)
    assert marked.prediction_type.value == V_PREDICTION
    spec = _detect(state, metadata={"modelspec.prediction_type": "epsilon"}).prediction_type
    assert (spec.value, spec.confidence) == (EPSILON, HIGH)
    step = _detect(state, global_step=875000).prediction_type
    assert (step.value, step.confidence) == (EPSILON, MEDIUM)
    forced = _detect(state, prediction_type="eps").prediction_type
    assert (forced.value, forced.confidence) == (EPSILON, OVERRIDE)
    with pytest.raises(ValueError, match="prediction type"):
        _detect(state, prediction_type="x0")

    # SD2 inpainting models predict epsilon; 9 input channels say so.
    inpaint_sd2 = {k: v for k, v in state.items()}
    key = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint_sd2[key] = np.zeros((64, 9, 3, 3), np.float32)
    assert _detect(inpaint_sd2).prediction_type.value == EPSILON

    # ComfyUI's statistic on the real key (the tiny fixture has no output_blocks.11): std > 0.09 means v.
    stat = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    rng = np.random.default_rng(0)
    for std, expected in ((0.2, V_PREDICTION), (0.02, EPSILON)):
        found = _detect({**state, stat: (std * rng.standard_normal(320)).astype(np.float32)}).prediction_type
        assert (found.value, found.confidence) == (expected, LOW), found


def test_marker_tensors_are_dropped():
    orig = original("sd2")
    plan, converted = _convert({**orig.state, "v_pred": np.zeros(0), "ztsnr": np.zeros(0)})
    assert plan.detection.prediction_type.value == V_PREDICTION
    assert "zero-terminal" in plan.detection.prediction_type.evidence
    _check_unet(orig, *converted["unet"])


def test_sd2_saved_by_sgm_code():
    """Stability's newer `sgm` code (e.g. SD-Turbo, an SD2.1 model) stores OpenCLIP under conditioner.embedders.0."""
    orig = original("sd2")
    state = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v for k, v in orig.state.items()}
    plan, converted = _convert(state)
    assert (plan.detection.family.value, plan.detection.text_encoder.value) == ("sd2", "openclip-sgm")
    _check_text(orig, *converted["text_encoder"])


def test_scale_factor_buffer_sets_the_vae_scaling():
    """Checkpoints trained with scale_by_std store the latent scale as a `scale_factor` buffer."""
    plan = plan_single_file({**original("sd1").state, "scale_factor": np.array(0.25, np.float32)})
    assert plan.components["vae"].config.scaling_factor == 0.25
    assert plan_single_file(original("sd1").state).components["vae"].config.scaling_factor == 0.18215


def test_family_override():
    plan = plan_single_file(original("sd1").state, family="sd1", prediction_type="v")
    assert plan.detection.family.confidence == OVERRIDE
    assert plan.detection.prediction_type.value == V_PREDICTION


# --- errors: one message naming the keys and the likely cause -----------------------------------------------


def test_corrupted_key_is_named():
    state = dict(original("sd1").state)
    bad = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    state[bad.replace("proj_in", "proj_inn")] = state.pop(bad)
    plan = plan_single_file(state)
    with pytest.raises(ConversionError) as e:
        plan.components["unet"].convert()
    message = str(e.value)
    assert "unet (model.diffusion_model.*)" in message
    assert "input_blocks.1.1.proj_inn.weight" in message  # the stray tensor
    assert "down_blocks.0.attentions.0.proj_in.weight" in message  # the parameter it left empty
    print(message)


def test_missing_tensor_is_named():
    state = {k: v for k, v in original("sd1").state.items() if k != "first_stage_model.decoder.up.0.block.1.conv2.bias"}
    with pytest.raises(ConversionError, match=r"missing.*decoder\.up_blocks\.2\.resnets\.1\.conv2\.bias"):
        plan_single_file(state).components["vae"].convert()


def test_wrong_family_override_is_explained():
    with pytest.raises(ConversionError, match=r"family sd1 expects cond_stage_model\.transformer.*drop the family"):
        plan_single_file(original("sd2").state, family="sd1")


def test_family_that_contradicts_the_unet_is_refused():
    """Head counts are invisible in shapes: SD1's 8 heads on an SD2 UNet would convert into wrong attention."""
    unet_only = {k: v for k, v in original("sd2").state.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(ConversionError, match=r"linear projections \(SD2 layout\) but the family is sd1"):
        plan_single_file(unet_only, family="sd1")


def test_foreign_tensors_are_named_with_a_cause():
    state = {**original("sd1").state, "control_model.input_hint_block.0.weight": np.zeros((16, 3, 3, 3))}
    with pytest.raises(ConversionError, match=r"control_model\.input_hint_block\.0\.weight.*ControlNet"):
        plan_single_file(state)
    diffusers_like = {"down_blocks.0.resnets.0.conv1.weight": np.zeros((32, 32, 3, 3))}
    with pytest.raises(ConversionError, match="not an original-layout SD checkpoint.*diffusers"):
        plan_single_file(diffusers_like)


def test_sdxl_is_detected_and_refused_for_now():
    state = {
        **original("sd2").state,
        "conditioner.embedders.1.model.positional_embedding": np.zeros((77, 128), np.float32),
    }
    found = _detect(state)
    assert found.family.value == "sdxl"
    with pytest.raises(ConversionError, match="SDXL"):
        plan_single_file(state)


def test_incomplete_ema_copy_is_refused():
    state = dict(original("sd1", ema=True).state)
    state.pop(next(k for k in state if k.startswith("model_ema.diffusion_model")))
    with pytest.raises(ConversionError, match="EMA copy does not match.*--no-ema"):
        plan_single_file(state)
    plan_single_file(state, use_ema=False)  # the raw weights are still there
