"""SD3 / SD3.5 LoRAs against diffusers on tiny random models: the MMDiT's and both CLIP towers' layers.

A PEFT LoRA over every Linear (and the patch conv) of the transformer and the CLIP towers, saved by diffusers'
`StableDiffusion3Pipeline.save_lora_weights`, loaded by diffusers' `load_lora_weights` and by ours: network outputs
within 1e-4 at weight 0.5 (`set_adapters`) and `fuse_lora`, images (prompt tag and `set_loras`) at >= 50 dB. The same
LoRA written as kohya's sd-scripts writes SD3 LoRAs (Stability's module names, fused qkv with a block-diagonal up, as
its split_qkv files store them) must give the same model: checked first on the diffusers side (the deltas merged into
Stability's fused weights, as ComfyUI and sd-scripts merge them, then converted by diffusers' own single-file
converter, against diffusers' PEFT model), then on ours. sd-scripts' T5 LoRAs (lora_te3_) follow its merge rule on
transformers' T5. Unloading restores the plain model bit for bit; UNet LoRAs on SD3 and SD3 LoRAs on SDXL are refused.
"""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from lora_fixtures import TEXT_TARGETS, drift_magnitudes, kohya_state, save_kohya
from safetensors.numpy import load_file
from test_lora import Tiny
from test_mmdit import to_single_file
from test_pipeline import as_array, generators
from tiny_sd3 import SD35_MEDIUM, sd3_folder, tiny_sd3

from mlx_sd.lora import AppliedLoRA, LoRAState, lora_networks, lora_targets
from mlx_sd.model import StableDiffusion
from mlx_sd.pipeline import Pipeline
from mlx_sd_convert import ConversionError
from mlx_sd_convert.library import LoraLibrary
from mlx_sd_convert.lora import read_lora
from oracles import assert_close, nchw_to_nhwc, psnr, state_dict_numpy, to_numpy

TOL = 1e-4
MIN_PSNR = 50.0
PROMPT = "a red lighthouse on mars, photo"
# Every Linear of the MMDiT and its patch conv, by the names PEFT matches (module path suffixes).
TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                       "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder", "linear_1",
                       "linear_2", "pos_embed.proj"]  # fmt: skip
RANK, ALPHA = 4, 2.0


class SD3:
    """A tiny diffusers SD3 pipeline, our model of the same weights, and fixed network inputs."""

    def __init__(self, tmp, transformer=None):
        self.tmp = tmp
        self.pipe = tiny_sd3(tmp, **({"transformer": transformer} if transformer else {}))
        self.pipe.set_progress_bar_config(disable=True)
        self.ours = StableDiffusion(sd3_folder(self.pipe, tmp / "mlx"))
        self.targets = lora_targets(self.ours)
        cfg = self.pipe.transformer.config
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(2, cfg.in_channels, 8, 12, generator=g)
        self.t = torch.tensor([980.0, 35.5])
        self.context = torch.randn(2, 9, cfg.joint_attention_dim, generator=g)
        self.pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
        self.ids = torch.tensor([[49406, 320, 1125, 539, 3309, 49407] + [49407] * 71] * 2)

    def ref_transformer(self, net=None) -> np.ndarray:
        with torch.no_grad():
            out = (net or self.pipe.transformer)(hidden_states=self.x, timestep=self.t, pooled_projections=self.pooled,
                                                 encoder_hidden_states=self.context).sample  # fmt: skip
        return to_numpy(out).transpose(0, 2, 3, 1)

    def our_transformer(self) -> np.ndarray:
        out = self.ours.unet(nchw_to_nhwc(self.x), mx.array(self.t.numpy()), mx.array(self.context.numpy()),
                             mx.array(self.pooled.numpy()))  # fmt: skip
        return np.array(out)

    ref_text = Tiny.ref_text
    our_text = Tiny.our_text

    def outputs(self) -> list[np.ndarray]:
        return [self.our_transformer(), self.our_text("text_encoder"), self.our_text("text_encoder_2")]

    def compare(self, what: str) -> None:
        errors = [assert_close(self.our_transformer(), self.ref_transformer(), TOL, f"{what} transformer")]
        errors += [assert_close(self.our_text(n), self.ref_text(n), TOL, f"{what} {n}") for n in CLIP]
        print(f"{what}: max error {max(errors):.1e}")


CLIP = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return SD3(tmp_path_factory.mktemp("lora-sd3"))


def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_sd3_lora(pipe, folder, seed: int, text: bool = True, dora: bool = False):
    """A random PEFT LoRA over the transformer (and the CLIP towers), saved as diffusers saves SD3 LoRAs; `dora`: a
    DoRA adapter, magnitudes as lora_fixtures makes them."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    def adapt(model, targets, offset):
        model = copy.deepcopy(model)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False,
                            use_dora=dora)  # fmt: skip
        model.add_adapter(config, adapter_name="a")
        _randomize_lora(model, seed + offset)
        if dora:
            drift_magnitudes(model, seed + offset)
        return get_peft_model_state_dict(model, adapter_name="a"), config.to_dict()

    layers, configs = {}, {}
    layers["transformer_lora_layers"], configs["transformer_lora_adapter_metadata"] = adapt(
        pipe.transformer, TRANSFORMER_TARGETS, 0
    )
    for i, enc in enumerate(CLIP if text else ()):
        layers[f"{enc}_lora_layers"], configs[f"{enc}_lora_adapter_metadata"] = adapt(
            getattr(pipe, enc), TEXT_TARGETS, i + 1
        )
    StableDiffusion3Pipeline.save_lora_weights(folder, **layers, **configs)
    return folder / "pytorch_lora_weights.safetensors"


# --- the kohya (sd-scripts) writer: diffusers module names -> Stability's, written here independently ----------


def _peft_layers(path, prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module path -> (A, B) of one network in a diffusers LoRA file."""
    state = load_file(str(path))
    layers = {}
    for key, value in state.items():
        if key.startswith(prefix + ".") and key.endswith(".lora_A.weight"):
            module = key[len(prefix) + 1 : -len(".lora_A.weight")]
            layers[module] = (value, state[f"{prefix}.{module}.lora_B.weight"])
    return layers


def _swap(up: np.ndarray) -> np.ndarray:
    first, second = np.split(up, 2, axis=0)
    return np.concatenate([second, first], axis=0)


def _fused(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Three LoRAs (A_i (r, in), B_i (out, r)) as one of rank 3r: downs stacked, ups block-diagonal (sd-scripts'
    split_qkv state dict)."""
    down = np.concatenate([a for a, _ in parts])
    up = np.zeros((sum(b.shape[0] for _, b in parts), down.shape[0]), np.float32)
    row = col = 0
    for _, b in parts:
        up[row : row + b.shape[0], col : col + b.shape[1]] = b
        row, col = row + b.shape[0], col + b.shape[1]
    return down, up


def kohya_mmdit(layers: dict, num_layers: int) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Stability's module name -> (down, up, alpha) for a diffusers-named transformer LoRA (every layer adapted)."""
    layers, out = dict(layers), {}
    pop = layers.pop
    fixed = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
             "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
             "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
             "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
             "final_layer.linear": "proj_out"}  # fmt: skip
    for sai, ours in fixed.items():
        out[sai] = (*pop(ours), ALPHA)
    down, up = pop("norm_out.linear")
    out["final_layer.adaLN_modulation.1"] = (down, _swap(up), ALPHA)
    for i in range(num_layers):
        t, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        out[f"{x}.attn.qkv"] = (*_fused([pop(f"{t}.attn.to_{n}") for n in "qkv"]), 3 * ALPHA)
        out[f"{c}.attn.qkv"] = (*_fused([pop(f"{t}.attn.add_{n}_proj") for n in "qkv"]), 3 * ALPHA)
        out[f"{x}.attn.proj"] = (*pop(f"{t}.attn.to_out.0"), ALPHA)
        out[f"{x}.adaLN_modulation.1"] = (*pop(f"{t}.norm1.linear"), ALPHA)
        out[f"{x}.mlp.fc1"] = (*pop(f"{t}.ff.net.0.proj"), ALPHA)
        out[f"{x}.mlp.fc2"] = (*pop(f"{t}.ff.net.2"), ALPHA)
        if f"{t}.attn.to_add_out" in layers:
            out[f"{c}.attn.proj"] = (*pop(f"{t}.attn.to_add_out"), ALPHA)
            out[f"{c}.adaLN_modulation.1"] = (*pop(f"{t}.norm1_context.linear"), ALPHA)
            out[f"{c}.mlp.fc1"] = (*pop(f"{t}.ff_context.net.0.proj"), ALPHA)
            out[f"{c}.mlp.fc2"] = (*pop(f"{t}.ff_context.net.2"), ALPHA)
        else:  # the last block's text modulation: (shift, scale) in Stability's layout
            down, up = pop(f"{t}.norm1_context.linear")
            out[f"{c}.adaLN_modulation.1"] = (down, _swap(up), ALPHA)
        if f"{t}.attn2.to_q" in layers:
            out[f"{x}.attn2.qkv"] = (*_fused([pop(f"{t}.attn2.to_{n}") for n in "qkv"]), 3 * ALPHA)
            out[f"{x}.attn2.proj"] = (*pop(f"{t}.attn2.to_out.0"), ALPHA)
    assert not layers, f"LoRA layers the writer left out: {sorted(layers)}"
    return out


def kohya_file(path, peft_path, num_layers: int, text: bool = True):
    state = kohya_state(kohya_mmdit(_peft_layers(peft_path, "transformer"), num_layers), "lora_unet",
                        dtype=np.float32)  # fmt: skip
    for enc, prefix in zip(CLIP if text else (), ("lora_te1", "lora_te2")):
        tensors = {m: (a, b, ALPHA) for m, (a, b) in _peft_layers(peft_path, enc).items()}
        state |= kohya_state(tensors, prefix, dtype=np.float32)  # PEFT's paths start with text_model. already
    return save_kohya(path, state)


def merged_by_diffusers_converter(net, kohya: dict, weight: float):
    """`net` with the kohya LoRA merged into Stability's fused weights (W += weight * alpha / r * up @ down, as
    ComfyUI and sd-scripts merge), converted back by diffusers' convert_sd3_transformer_checkpoint_to_diffusers."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    plain = copy.deepcopy(net)
    single = to_single_file(state_dict_numpy(plain), plain.config.num_layers, prefix="")
    for name, (down, up, alpha) in kohya.items():
        w = single[f"{name}.weight"]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * (alpha / down.shape[0])
        single[f"{name}.weight"] = (w + weight * delta.reshape(w.shape)).astype(np.float32)
    converted = convert_sd3_transformer_checkpoint_to_diffusers({k: torch.from_numpy(v) for k, v in single.items()})
    plain.load_state_dict(converted, strict=True)
    return plain


# --- tests ----------------------------------------------------------------------------------------------------


def test_peft_lora_matches_diffusers_and_unloads_exactly(sd3, tmp_path):
    before = sd3.outputs()
    path = peft_sd3_lora(sd3.pipe, tmp_path, seed=1)
    lora = read_lora(path, sd3.targets)
    assert len(lora.layers["unet"]) == len(sd3.targets.shapes["unet"])  # every Linear and the patch conv
    sd3.pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="a")
    try:
        state = LoRAState()
        for weight in (0.5, -1.3):
            sd3.pipe.set_adapters(["a"], [weight])
            state.apply(lora_networks(sd3.ours), [AppliedLoRA(lora, weight)])
            sd3.compare(f"sd3 peft x{weight}")
        assert not any(np.allclose(a, b, atol=1e-3) for a, b in zip(sd3.outputs(), before))  # not met trivially
        state.clear(lora_networks(sd3.ours))
        assert all(np.array_equal(a, b) for a, b in zip(sd3.outputs(), before))
        sd3.pipe.set_adapters(["a"], [1.0])
        sd3.pipe.fuse_lora(lora_scale=0.7)
        state.apply(lora_networks(sd3.ours), [AppliedLoRA(lora, 0.7)])
        sd3.compare("sd3 fuse_lora(lora_scale=0.7)")
        sd3.pipe.unfuse_lora()
        state.clear(lora_networks(sd3.ours))
    finally:
        sd3.pipe.unload_lora_weights()
    assert all(np.array_equal(a, b) for a, b in zip(sd3.outputs(), before))


def test_peft_dora_transformer_matches_diffusers(sd3, tmp_path):
    """A PEFT DoRA adapter (use_dora, lora_magnitude_vector) over every MMDiT Linear and the patch conv, at adapter
    weights 1 and 0.6 (PEFT's rule: tests/test_dora.py)."""
    before = sd3.our_transformer()
    path = peft_sd3_lora(sd3.pipe, tmp_path, seed=9, text=False, dora=True)
    lora = read_lora(path, sd3.targets)
    assert {layer.dora.rule for layer in lora.layers["unet"].values()} == {"peft"}
    sd3.pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="d")
    try:
        state = LoRAState()
        for weight in (1.0, 0.6):
            sd3.pipe.set_adapters(["d"], [weight])
            state.apply(lora_networks(sd3.ours), [AppliedLoRA(lora, weight)])
            error = assert_close(sd3.our_transformer(), sd3.ref_transformer(), TOL, f"sd3 PEFT DoRA x{weight}")
            print(f"sd3 PEFT DoRA x{weight}: transformer max error {error:.1e}")
        state.clear(lora_networks(sd3.ours))
    finally:
        sd3.pipe.unload_lora_weights()
    assert np.array_equal(sd3.our_transformer(), before)


@pytest.mark.parametrize("variant", ["sd3-medium", "sd3.5-medium"])
def test_kohya_writer_agrees_with_diffusers_converter_and_ours(sd3, tmp_path, tmp_path_factory, variant):
    """The kohya file (Stability's names, fused qkv) merged into Stability's weights and converted by diffusers is
    diffusers' PEFT model; ours reads that file onto the same layers (SD3.5 medium: qk norms and attn2 too)."""
    tiny = sd3 if variant == "sd3-medium" else SD3(tmp_path_factory.mktemp("lora-sd35m"), SD35_MEDIUM)
    peft = peft_sd3_lora(tiny.pipe, tmp_path / "peft", seed=3)
    num_layers = tiny.pipe.transformer.config.num_layers
    kohya = kohya_mmdit(_peft_layers(peft, "transformer"), num_layers)
    assert any(".attn2.qkv" in k for k in kohya) == (variant == "sd3.5-medium")
    weight = 0.8
    merged = merged_by_diffusers_converter(tiny.pipe.transformer, kohya, weight)
    tiny.pipe.load_lora_weights(str(peft.parent), weight_name=peft.name, adapter_name="a")
    try:
        tiny.pipe.set_adapters(["a"], [weight])
        error = assert_close(tiny.ref_transformer(merged), tiny.ref_transformer(), TOL, "kohya merged vs PEFT")
        print(f"{variant} kohya writer, merged + diffusers' converter vs diffusers' PEFT LoRA: {error:.1e}")
        path = kohya_file(tmp_path / "kohya.safetensors", peft, num_layers)
        ours, theirs = read_lora(path, tiny.targets), read_lora(peft, tiny.targets)
        assert {c: set(v) for c, v in ours.layers.items()} == {c: set(v) for c, v in theirs.layers.items()}
        state = LoRAState()
        state.apply(lora_networks(tiny.ours), [AppliedLoRA(ours, weight)])
        tiny.compare(f"{variant} kohya x{weight}")
        state.clear(lora_networks(tiny.ours))
    finally:
        tiny.pipe.unload_lora_weights()


def test_prompt_tags_and_set_loras_images_match_diffusers(sd3, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    peft = peft_sd3_lora(sd3.pipe, folder, seed=5)
    peft = peft.rename(folder / "ink.safetensors")
    kohya = kohya_file(folder / "ink_kohya.safetensors", peft, sd3.pipe.transformer.config.num_layers)
    ours = Pipeline(sd3.ours, lora_resolver=LoraLibrary(folder))
    kwargs = dict(width=64, height=64, steps=4, guidance=5.0, seed=11)
    plain = ours.generate(prompt=PROMPT, **kwargs)

    sd3.pipe.load_lora_weights(str(folder), weight_name="ink.safetensors", adapter_name="ink")
    try:
        sd3.pipe.set_adapters(["ink"], [0.8])
        expected = sd3.pipe(PROMPT + " ", width=64, height=64, num_inference_steps=4, guidance_scale=5.0,
                            generator=generators(11, 1), output_type="np").images  # fmt: skip
    finally:
        sd3.pipe.unload_lora_weights()
    results = {
        "<lora:ink:0.8>": ours.generate(prompt=PROMPT + " <lora:ink:0.8>", **kwargs),
        "<lora:ink_kohya:0.8>": ours.generate(prompt=PROMPT + " <lora:ink_kohya:0.8>", **kwargs),
    }
    ours.set_loras([(read_lora(kohya, ours.lora_targets()), 0.8)])
    results["set_loras kohya x0.8"] = ours.generate(prompt=PROMPT + " ", **kwargs)
    ours.set_loras([])
    for what, result in results.items():
        value = psnr(as_array(result.images), expected, data_range=1.0)
        print(f"SD3 image with {what}: PSNR {value:.1f} dB against diffusers")
        assert value >= MIN_PSNR, f"{what}: {value:.1f} dB"
    assert results["<lora:ink:0.8>"].infotexts[0].startswith(f"{PROMPT} <lora:ink:0.8>\n")
    assert "<lora:ink_kohya:0.8>" in results["set_loras kohya x0.8"].infotexts[0].splitlines()[0]
    again = ours.generate(prompt=PROMPT, **kwargs)  # LoRAs removed: the plain model, bit for bit
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(plain.images[0]))
    assert not ours._lora_state.active


def test_t5_lora_follows_sd_scripts_merge_rule(sd3, tmp_path):
    """sd-scripts' lora_te3_ (T5) keys: W += weight * alpha / r * up @ down on transformers' T5, which diffusers
    cannot load for SD3; the multiplier is the text one (<lora:name:te:unet>)."""
    t5 = copy.deepcopy(sd3.pipe.text_encoder_3)
    rng = np.random.default_rng(4)
    tensors = {}
    for name, module in t5.named_modules():
        if isinstance(module, torch.nn.Linear):
            down = rng.normal(0, 0.2, (RANK, module.in_features)).astype(np.float32)
            up = rng.normal(0, 0.2, (module.out_features, RANK)).astype(np.float32)
            tensors[name] = (down, up, ALPHA)
    weight = 0.6
    with torch.no_grad():
        for name, (down, up, alpha) in tensors.items():
            t5.get_submodule(name).weight += torch.from_numpy(weight * (alpha / RANK) * up @ down)
    path = save_kohya(tmp_path / "t5.safetensors", kohya_state(tensors, "lora_te3", dtype=np.float32))
    lora = read_lora(path, sd3.targets)
    assert set(lora.layers) == {"text_encoder_3"}
    ids = torch.tensor([[37, 5, 120, 9, 1] + [0] * 11])
    encoder = lora_networks(sd3.ours)["text_encoder_3"]
    before = np.array(encoder(mx.array(ids.numpy())))
    state = LoRAState()
    state.apply(lora_networks(sd3.ours), [AppliedLoRA(lora, 1.0, text_weight=weight)])
    with torch.no_grad():
        expected = to_numpy(t5(ids).last_hidden_state)
    error = assert_close(np.array(encoder(mx.array(ids.numpy()))), expected, TOL, "T5 with lora_te3")
    print(f"T5 LoRA (lora_te3) vs sd-scripts' merge on transformers' T5: {error:.1e}")
    state.clear(lora_networks(sd3.ours))
    assert np.array_equal(np.array(encoder(mx.array(ids.numpy()))), before)


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("lora-sdxl-for-sd3"), "sdxl")


def test_loras_for_the_other_architecture_are_refused(sd3, sdxl, tmp_path):
    from lora_fixtures import peft_lora

    xl = peft_lora(sdxl.parts, tmp_path / "xl", seed=4)
    with pytest.raises(ConversionError, match=r"name no layer .* for a UNet model \(SD1/SD2/SDXL.* the model is sd3"):
        read_lora(xl, sd3.targets)
    peft = peft_sd3_lora(sd3.pipe, tmp_path / "sd3", seed=4)
    with pytest.raises(ConversionError, match=r"name no layer .* for SD3 / SD3.5 .* the model is sdxl"):
        read_lora(peft, sdxl.targets)
    kohya = kohya_file(tmp_path / "k.safetensors", peft, sd3.pipe.transformer.config.num_layers, text=False)
    with pytest.raises(ConversionError, match=r"name no layer .*lora_unet_context_embedder.* for SD3 / SD3.5 .*sdxl"):
        read_lora(kohya, sdxl.targets)


def test_unknown_twice_and_misshaped_sd3_keys_are_named(sd3, tmp_path):
    down, up = np.zeros((2, 16), np.float32), np.zeros((48, 2), np.float32)
    base = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down,
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up}  # fmt: skip
    cases = {
        "unmatched": ({"lora_unet_joint_blocks_7_x_block_attn_qkv.lora_down.weight": down},
                      "name no layer of this model .*joint_blocks_7"),
        "twice": ({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": down,
                   "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": up[:16]},
                  r"adapted twice .*transformer_blocks\.0\.attn\.to_k"),
        "shape": ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up[:47]},
                  r"wrong shape .*x_block\.attn\.qkv: the LoRA makes \(47, 16\), the layer is \(48, 16\)"),
        "dora": ({"lora_unet_joint_blocks_0_x_block_attn_qkv.dora_scale": up[:, :1]},
                 "x_block.attn.qkv: Stability's fused layer takes LoRAs only, not a LoRA with DoRA"),
        "loha": ({f"lora_unet_joint_blocks_0_context_block_attn_qkv.hada_{w}": m
                  for w, m in (("w1_a", up), ("w1_b", down), ("w2_a", up), ("w2_b", down))},
                 "context_block.attn.qkv: Stability's fused layer takes LoRAs only, not a LoHa"),
    }  # fmt: skip
    for name, (extra, message) in cases.items():
        with pytest.raises(ConversionError, match=message):
            read_lora(save_kohya(tmp_path / f"{name}.safetensors", {**base, **extra}), sd3.targets)
    comfy = {"diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight": down,
             "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight": up}  # fmt: skip
    a = read_lora(save_kohya(tmp_path / "comfy.safetensors", comfy), sd3.targets)
    b = read_lora(save_kohya(tmp_path / "kohya.safetensors", base), sd3.targets)
    assert set(a.layers["unet"]) == set(b.layers["unet"]) == {f"transformer_blocks.0.attn.to_{n}" for n in "qkv"}
