"""Reference-only control (A1111's ControlNet extension: reference_only, reference_adain, reference_adain+attn)
against the extension's hooks transcribed onto diffusers' UNet: its `hacked_basic_transformer_inner_forward` on every
BasicTransformerBlock (ranked by width, in the original UNet's module order) and its `hacked_group_norm_forward` on
the outputs of the original's middle block, input blocks 4, 5, 7, 8, 10, 11 and output blocks 0-7 (SDXL: 4, 5, 7, 8
and 0-5), with the reference passes and the main pass of one guided model call. The UNets have the real block
layouts (SD 1.x: four stages of two layers; SDXL: three) at tiny widths, so that every numbered block exists.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from mlx_sd.controlnet import ControlNetUnit
from mlx_sd.models.layers import TextContext
from mlx_sd.reference import ADAIN_BLOCKS, Reference
from mlx_sd_convert.diffusers import convert_weights, unet_config
from oracles import assert_close, load_ours, nchw_to_nhwc, randomize, state_dict_numpy

LAYOUTS = {
    "sd1": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_head_dim=4, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=[2, 4, 4],
                 transformer_layers_per_block=[1, 2, 2], cross_attention_dim=64, use_linear_projection=True,
                 down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
}  # fmt: skip


class Extension:
    """The extension's hooks (hook.py), transcribed onto a diffusers UNet."""

    def __init__(self, unet, sdxl: bool):
        self.forward = unet.forward  # the UNet's own (a pipeline's test may wrap the module's)
        self.attn, self.gn, self.weight, self.style, self.uc = "read", "read", 0.0, 0.0, []
        stages = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]  # the original's order: down, middle, up
        blocks = [b for s in stages for a in getattr(s, "attentions", []) for b in a.transformer_blocks]
        ranked = sorted(blocks, key=lambda b: -b.norm1.normalized_shape[0])
        for i, block in enumerate(ranked):
            block.bank, block.style_cfgs, block.attn_weight = [], [], float(i) / float(len(ranked))
            block.forward = self._transformer_block(block)
        inputs, outputs = ADAIN_BLOCKS[sdxl]
        per = unet.config.layers_per_block + 1
        self.gn_modules = [(unet.mid_block, 0.0)]
        for w, i in enumerate(inputs):  # input block i: stage (i - 1) // per, layer (i - 1) % per
            if (i - 1) // per >= len(unet.down_blocks):  # (a tiny layout: the extension would fail; left out)
                continue
            block = unet.down_blocks[(i - 1) // per]
            layer = (i - 1) % per
            if layer >= len(block.resnets):  # a downsampler's number in a tiny layout: left out as mlx-sd does
                continue
            module = block.attentions[layer] if getattr(block, "attentions", None) else block.resnets[layer]
            self.gn_modules.append((module, 1.0 - float(w) / float(len(inputs))))
        for w, i in enumerate(outputs):
            if i // per >= len(unet.up_blocks):
                continue
            block, layer = unet.up_blocks[i // per], i % per
            if layer == per - 1 and block.upsamplers is not None:
                module = block.upsamplers[0]
            else:
                module = block.attentions[layer] if getattr(block, "attentions", None) else block.resnets[layer]
            self.gn_modules.append((module, float(w) / float(len(outputs))))
        for module, weight in self.gn_modules:
            module.gn_weight, module.mean_bank, module.var_bank, module.gn_styles = weight * 2, [], [], []
            module.register_forward_hook(self._group_norm)

    def _transformer_block(self, block):
        def forward(hidden_states, attention_mask=None, encoder_hidden_states=None, **kwargs):
            x_norm1 = block.norm1(hidden_states)
            self_attn1 = None
            if self.attn == "write" and self.weight > block.attn_weight:
                block.bank.append(x_norm1.detach().clone())
                block.style_cfgs.append(self.style)
            if self.attn == "read":
                if len(block.bank) > 0:
                    style_cfg = sum(block.style_cfgs) / float(len(block.style_cfgs))
                    uc = block.attn1(x_norm1, encoder_hidden_states=torch.cat([x_norm1] + block.bank, dim=1))
                    c = uc.clone()
                    if len(self.uc) > 0 and style_cfg > 1e-5:
                        c[self.uc] = block.attn1(x_norm1[self.uc], encoder_hidden_states=x_norm1[self.uc])
                    self_attn1 = style_cfg * c + (1.0 - style_cfg) * uc
                block.bank, block.style_cfgs = [], []
            if self_attn1 is None:
                self_attn1 = block.attn1(x_norm1)
            hidden_states = self_attn1 + hidden_states
            hidden_states = block.attn2(block.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states) + (
                hidden_states
            )
            return block.ff(block.norm3(hidden_states)) + hidden_states

        return forward

    def _group_norm(self, module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        y = None
        if self.gn == "write" and self.weight > module.gn_weight:
            var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
            module.mean_bank.append(mean)
            module.var_bank.append(var)
            module.gn_styles.append(self.style)
        if self.gn == "read":
            if len(module.mean_bank) > 0:
                style_cfg = sum(module.gn_styles) / float(len(module.gn_styles))
                var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
                std = torch.maximum(var, torch.zeros_like(var) + 1e-6) ** 0.5
                mean_acc = sum(module.mean_bank) / float(len(module.mean_bank))
                var_acc = sum(module.var_bank) / float(len(module.var_bank))
                std_acc = torch.maximum(var_acc, torch.zeros_like(var_acc) + 1e-6) ** 0.5
                y_uc = (((x - mean) / std) * std_acc) + mean_acc
                y_c = y_uc.clone()
                if len(self.uc) > 0 and style_cfg > 1e-5:
                    y_c[self.uc] = x[self.uc]
                y = style_cfg * y_c + (1.0 - style_cfg) * y_uc
            module.mean_bank, module.var_bank, module.gn_styles = [], [], []
        if y is None:
            return output
        return (y,) if isinstance(output, tuple) else y

    def __call__(self, x, t, context, units, latents, noises, alphas, added=None):
        """One model call of the extension's forward: each unit's reference pass, then the UNet's own."""
        self.uc = list(range(x.shape[0] // 2))
        ti = int(torch.round(torch.tensor(float(t))))
        for (module, weight, style), latent, noise in zip(units, latents, noises):
            ref_xt = alphas[ti].sqrt() * latent + (1 - alphas[ti]).sqrt() * noise
            self.style = style
            if module in ("reference_only", "reference_adain+attn"):
                self.attn, self.weight = "write", weight
            if module in ("reference_adain", "reference_adain+attn"):
                self.gn, self.weight = "write", weight
            self.forward(ref_xt, t, encoder_hidden_states=context, added_cond_kwargs=added)
            self.attn = self.gn = "read"
        return self.forward(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


CASES = [  # kind, ((module, weight, threshold_a / style fidelity), ...)
    ("sd1", (("reference_only", 1.0, 0.5),)),
    ("sd1", (("reference_only", 0.5, 0.0),)),
    ("sd1", (("reference_adain", 1.0, 0.5),)),
    ("sd1", (("reference_adain+attn", 0.7, 1.0),)),
    ("sd1", (("reference_only", 0.8, 0.5), ("reference_adain", 1.2, 0.3))),  # the second pass reads the first's
    ("sdxl", (("reference_adain+attn", 1.0, 0.5),)),
]


@pytest.mark.parametrize("kind,units", CASES)
def test_reference_model_call_matches_the_extension(kind, units):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = randomize(UNet2DConditionModel(norm_num_groups=32, **LAYOUTS[kind]), 3).eval()
    cfg = unet_config(dict(ref.config))
    ours = load_ours(cfg, convert_weights("unet", cfg, state_dict_numpy(ref)))
    g = torch.Generator().manual_seed(1)
    B, size = 2, 16
    x = torch.randn(B, 4, size, size, generator=g)
    context = torch.randn(B, 7, cfg.cross_attention_dim, generator=g)
    latents = [torch.randn(1, 4, size, size, generator=g) for _ in units]
    noises = [torch.randn(B, 4, size, size, generator=g) for _ in units]
    added = pooled = time_ids = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(B, 16, generator=g), "time_ids": torch.rand(B, 6, generator=g) * 64}
        pooled, time_ids = mx.array(added["text_embeds"].numpy()), mx.array(added["time_ids"].numpy())
    alphas = torch.linspace(0.9991, 0.0047, 1000, dtype=torch.float64)
    t = 604.4  # rounds down
    sdxl = kind == "sdxl"
    styles = [s**3 if sdxl else s for _, _, s in units]
    with torch.no_grad():
        expected = Extension(ref, sdxl)(x, torch.tensor(t), context, [(m, w, s) for (m, w, _), s in
                                        zip(units, styles)], latents, noises, alphas.float(), added)  # fmt: skip

    image = Image.new("RGB", (8, 8))
    our_units = [ControlNetUnit(None, image, weight=w, module=m, threshold_a=s) for m, w, s in units]
    reference = Reference(ours, [(u, nchw_to_nhwc(lat)) for u, lat in zip(our_units, latents)], sdxl, False,
                          alphas.float().numpy(), 0)  # fmt: skip
    drawn = iter(nchw_to_nhwc(n) for n in noises)
    reference.noise = lambda shape: next(drawn)
    text = TextContext(mx.array(context.numpy()))
    text.reference = reference
    x_mx, t_mx = nchw_to_nhwc(x), mx.array(t)
    run = lambda z: ours(z, t_mx, text, pooled, time_ids)  # noqa: E731
    reference.write(run, x_mx, t, lambda unit: True, None, B // 2)
    got = ours(x_mx, t_mx, text, pooled, time_ids)
    assert_close(got, expected.permute(0, 2, 3, 1), 2e-5, f"{kind} {units}")
    plain = ours(x_mx, t_mx, TextContext(mx.array(context.numpy())), pooled, time_ids)
    assert float(mx.abs(plain - got).max()) > 1e-2  # the reference acts


def test_reference_generation_matches_diffusers_with_the_extension(sd1, monkeypatch):
    """A txt2img request with a reference_only unit (and a guidance window) against diffusers' pipeline whose UNet
    runs the extension's forward: the reference image's VAE mean, each call's noise (shared), the window."""
    from test_pipeline import PROMPT, diffusers_pipe, generators

    from oracles import psnr

    parts, ours = sd1
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    drawn = []

    def noise(self, shape):
        drawn.append(rng.standard_normal(shape).astype(np.float32))
        return mx.array(drawn[-1])

    monkeypatch.setattr(Reference, "noise", noise)
    unit = ControlNetUnit(None, image, weight=0.9, guidance_end=0.75, module="reference_only", threshold_a=0.6)
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=4, guidance=5.0, seed=5,
                           sampler="EulerDiscreteScheduler", controlnet=(unit,))  # fmt: skip
    assert len(drawn) == 3  # one reference pass per step inside the window
    assert "Module: reference_only, Model: None, Weight: 0.9" in result.infotexts[0]

    pipe = diffusers_pipe("StableDiffusionPipeline", {**parts, "unet": copy.deepcopy(parts["unet"])},
                          "EulerDiscreteScheduler")  # (its UNet hooked below: a copy of the module's)  # fmt: skip
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)[None].transpose(0, 3, 1, 2) / 127.5 - 1)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    extension = Extension(pipe.unet, False)
    calls = iter(torch.from_numpy(n).permute(0, 3, 1, 2) for n in drawn)
    alphas = pipe.scheduler.alphas_cumprod
    step = iter(range(4))

    def forward(sample, t, encoder_hidden_states=None, **kwargs):
        if next(step) < 3:  # the window: steps 0-2 of 4 (3 / 4 > 0.75 ends it, the diffusers rule)
            out = extension(sample, t, encoder_hidden_states, [("reference_only", 0.9, 0.6)], [latent],
                            [next(calls)], alphas)  # fmt: skip
        else:
            out = extension.forward(sample, t, encoder_hidden_states=encoder_hidden_states).sample
        return (out,)

    pipe.unet.forward = forward
    expected = pipe(PROMPT, width=64, height=64, num_inference_steps=4, guidance_scale=5.0,
                    generator=generators(5, 1), output_type="np").images  # fmt: skip
    value = psnr(np.stack([np.asarray(im, np.float32) / 255 for im in result.images]), expected, data_range=1.0)
    print(f"reference_only generation: PSNR {value:.1f} dB")
    assert value >= 50, f"reference_only generation: PSNR {value:.1f} dB"
