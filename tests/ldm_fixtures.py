"""Tiny Stable Diffusion checkpoints made by the ORIGINAL code, in the original single-file layout.

stable-diffusion-sdkit's `ldm` builds the UNet, Encoder and Decoder; the text towers are the ones ldm wraps
(transformers' CLIPTextModel for SD1, an open_clip CLIP for SD2). Every parameter is randomised, and the modules are
assembled under the attribute names of ldm's LatentDiffusion (which itself needs pytorch_lightning), so the state
dicts have the genuine layout: `model.diffusion_model.*`, `model_ema.*`, `first_stage_model.*`,
`cond_stage_model.*` and the schedule buffers. Also the parity checks against the same original modules.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch

from mlx_sd_convert.families import family_config
from mlx_sd_convert.ldm import plan_single_file
from oracles import assert_close, ldm_module, load_ours, nchw_to_nhwc, open_clip_module, randomize, token_batch

FP32_TOL = 1e-4

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
    # InstructPix2Pix's layout: latents + the image to edit.
    "pix2pix": dict(
        in_channels=8,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        num_heads=8,
        transformer_depth=1,
        use_linear_in_transformer=False,
    ),
}
FAMILY = {"sd1": "sd1", "sd2": "sd2", "inpaint": "sd1", "pix2pix": "sd1"}
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
        state = with_text_model_prefix(state)
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


def with_text_model_prefix(state: dict) -> dict:
    """Published SD1 files were saved with transformers 4.x: `cond_stage_model.transformer.text_model.*` plus the
    int64 position_ids buffer. transformers >= 5.6 (here) drops both; put them back."""
    prefix = "cond_stage_model.transformer."
    out = {(f"{prefix}text_model.{k[len(prefix) :]}" if k.startswith(prefix) else k): v for k, v in state.items()}
    out[f"{prefix}text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def convert_all(state, **options):
    plan = plan_single_file(state, **options)
    return plan, {name: (c.config, c.convert()) for name, c in plan.components.items()}


# --- the same inputs through the original modules and ours ------------------------------------------------


def check_unet(orig: Original, config, weights, seed=0) -> float:
    return check_unet_model(orig, load_ours(config, weights), seed)


def check_unet_model(orig: Original, ours, seed=0) -> float:
    """Our loaded UNet against the original module on the same inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, ours.config.in_channels, 12, 8, generator=g)
    t = torch.tensor([999.0, 17.5])
    context = torch.randn(2, 7, TEXT_WIDTH, generator=g)
    with torch.no_grad():
        expected = orig.unet(x, timesteps=t, context=context)
    got = ours(nchw_to_nhwc(x), mx.array(t.numpy()), mx.array(context.numpy()))
    return assert_close(got, nchw_to_nhwc(expected), FP32_TOL, f"{orig.kind} unet")


def check_vae(orig: Original, config, weights) -> dict[str, float]:
    return check_vae_model(orig, load_ours(config, weights))


def check_vae_model(orig: Original, ours) -> dict[str, float]:
    """As ldm's AutoencoderKL: encode = Gaussian(quant_conv(encoder(x))), decode = decoder(post_quant_conv(z))."""
    Gaussian = ldm_module("modules.distributions.distributions").DiagonalGaussianDistribution
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


def check_text(orig: Original, config, weights) -> float:
    return check_text_model(orig, load_ours(config, weights))


def check_text_model(orig: Original, ours) -> float:
    """What ldm's conditioning stage returns for token ids (after its tokenizer)."""
    pad = 0 if FAMILY[orig.kind] == "sd2" else 49407
    ids = token_batch(pad)
    with torch.no_grad():
        if FAMILY[orig.kind] == "sd2":
            expected = orig.cond.encode_with_transformer(torch.from_numpy(ids))  # layer="penultimate"
        else:
            expected = orig.cond.transformer(input_ids=torch.from_numpy(ids)).last_hidden_state  # layer="last"
    return assert_close(ours(mx.array(ids)).last_hidden_state, expected, FP32_TOL, f"{orig.kind} text")


# --- full size, shapes only ----------------------------------------------------------------------------------

FULL_UNETS = {
    # v1-inference.yaml and v2-inference(-v).yaml
    "sd1": dict(num_heads=8, context_dim=768, use_linear_in_transformer=False),
    "sd2": dict(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
}


def full_size_file(family: str) -> dict[str, np.ndarray]:
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
    return with_text_model_prefix(state) if family == "sd1" else state
