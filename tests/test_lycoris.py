"""LyCORIS networks (LoHa, LoKr, full, Tucker LoCon) and DoRA, applied as AUTOMATIC1111's Lora extension applies them.

References, never our code with itself:
- LoHa and LoKr: PEFT 0.21 (`LoHaConfig`, `LoKrConfig`, whose parameters carry LyCORIS's names) on the tiny diffusers
  UNet and CLIP towers, random factors; the file is written in LyCORIS's kohya key layout from PEFT's parameters, its
  `.alpha` mapped from PEFT's alpha / r (A1111 divides by the rank of lokr_w2_b / lokr_w1_b / hada_w1_b; where a LoKr
  layer has two full matrices A1111 scales by 1, so PEFT's scale is folded into lokr_w1). The reference model is the
  torch model with PEFT's delta (`get_delta_weight`) merged at the strength.
- DoRA (`dora_scale` on a kohya LoRA and LoCon convs), Tucker LoCon (`lora_mid`) and full (`diff`, `diff_b`): a
  transcription of A1111's formulas (network_lora / network_full calc_updown, network.py finalize_updown and
  apply_weight_decompose) written below in torch, A1111 not being installable. Two strengths each, since DoRA is not
  linear in the strength; several networks on one layer in order, as A1111's network_apply_weights adds them.
Errors are max|ours - ref| / max|ref| at float32.
"""

import copy
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from lora_fixtures import TEXT_TARGETS, UNET_TARGETS, ldm_name, random_lora_tensors, save_kohya
from test_lora import Tiny
from tiny_pipelines import mlx_folder

from mlx_sd.lora import AppliedLoRA, LoRALinear, LoRAState, lora_networks
from mlx_sd.model import StableDiffusion
from mlx_sd.pipeline import Pipeline
from mlx_sd.quantization import QuantizationConfig, quantize_model
from mlx_sd_convert import ConversionError
from mlx_sd_convert.library import LoraLibrary
from mlx_sd_convert.lora import read_lora
from oracles import assert_close, psnr, to_numpy

TOL = 1e-4
MIN_PSNR = 50.0
# 3x3 convolutions (Tucker forms apply), 1x1 ones (conv_shortcut; SD1's proj_in/proj_out, Linear on our side) and
# the Linears of attention, feed-forward and time embedding.
LYCORIS_UNET_TARGETS = UNET_TARGETS + ["conv_in", "conv_out", "linear_1", "linear_2"]
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@pytest.fixture(scope="module")
def tiny1(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("lyco-sd1"), "sd1")


@pytest.fixture(scope="module")
def tinyxl(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("lyco-sdxl"), "sdxl")


# --- PEFT LoHa / LoKr written as LyCORIS files -----------------------------------------------------------------


class PeftNetwork:
    """PEFT LoHa/LoKr adapters with random factors on copies of a tiny model's UNet and text towers."""

    def __init__(self, tiny: Tiny, config: dict, seed: int, std: float):
        from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
        from peft.tuners.lycoris_utils import LycorisLayer

        self.tiny, self.kind = tiny, config["kind"]
        make = LoHaConfig if self.kind == "loha" else LoKrConfig
        options = {k: v for k, v in config.items() if k != "kind"}
        self.adapted, self.layers = {}, {}
        g = torch.Generator().manual_seed(seed)
        for part in ("unet", *tiny.text_names()):
            targets = LYCORIS_UNET_TARGETS if part == "unet" else TEXT_TARGETS
            model = inject_adapter_in_model(make(target_modules=targets, **options), copy.deepcopy(tiny.parts[part]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".hada_" in name or ".lokr_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * std)
            self.adapted[part] = model
            self.layers[part] = {n: m for n, m in model.named_modules() if isinstance(m, LycorisLayer)}

    def state(self) -> dict[str, np.ndarray]:
        """The LyCORIS file: kohya keys (SD1: diffusers names; SDXL: original LDM names, lora_te1_/lora_te2_)."""
        prefixes = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
        if self.tiny.kind == "sdxl":
            prefixes["text_encoder"] = "lora_te1"
        state = {}
        for part, layers in self.layers.items():
            for path, layer in layers.items():
                key = f"{prefixes[part]}_{self._module_name(part, path).replace('.', '_')}"
                state |= {f"{key}.{role}": value for role, value in self.tensors(layer).items()}
        return state

    def tensors(self, layer) -> dict[str, np.ndarray]:
        roles = LOHA_ROLES if self.kind == "loha" else LOKR_ROLES
        out = {r: getattr(layer, r)["default"].detach().numpy().copy() for r in roles if "default" in getattr(layer, r)}
        alpha, rank = layer.alpha["default"], layer.r["default"]
        if self.kind == "lokr" and "lokr_w1_b" not in out and "lokr_w2_b" not in out:
            out["lokr_w1"] = out["lokr_w1"] * (alpha / rank)  # A1111: no low-rank factor, scale 1 (the alpha ignored)
        if alpha != rank or (self.kind == "lokr" and "lokr_w2" in out and "lokr_w1" in out):
            out["alpha"] = np.array(alpha, np.float32)  # else no alpha: A1111 scales by 1, PEFT by alpha / r = 1
        return out

    def _module_name(self, part: str, path: str) -> str:
        if part != "unet" or self.tiny.kind != "sdxl":
            return path
        config = self.tiny.parts["unet"].config
        attention = tuple(i for i, t in enumerate(config.down_block_types) if t.startswith("CrossAttn"))
        return ldm_name(path, len(config.block_out_channels), config.layers_per_block, attention)

    def merged(self, strength: float) -> dict[str, torch.nn.Module]:
        """Copies of the plain torch parts with PEFT's delta merged at `strength`."""
        out = {}
        for part, layers in self.layers.items():
            model = copy.deepcopy(self.tiny.parts[part])
            with torch.no_grad():
                for path, layer in layers.items():
                    model.get_submodule(path).weight += strength * layer.get_delta_weight("default")
            out[part] = model
        return out


CONFIGS = {
    # LoHa: Tucker cores on 3x3 convolutions (t1/t2), plain products on Linears and 1x1 convolutions.
    "loha tucker alpha": dict(kind="loha", r=4, alpha=2.0, use_effective_conv2d=True),
    # LoHa without Tucker (conv w1b (r, in*3*3)) and without alpha (PEFT alpha = r: scale 1).
    "loha flat no-alpha": dict(kind="loha", r=4, alpha=4.0, use_effective_conv2d=False),
    # LoKr, both factors low-rank (decompose_both, r=1 < max/2), Tucker t2 on 3x3 convs: dim from lokr_w2_b.
    "lokr factored tucker": dict(kind="lokr", r=1, alpha=0.5, decompose_both=True, use_effective_conv2d=True),
    # LoKr, full w1 and factored w2, flat on convs (w2b (r, in_b*3*3)).
    "lokr w1 full": dict(kind="lokr", r=2, alpha=3.0, use_effective_conv2d=False),
    # LoKr, rank high enough for full w2 on most layers: two full matrices there (scale 1, alpha ignored), factored
    # w2 where a dimension is prime (CLIP's 37-wide MLP).
    "lokr full": dict(kind="lokr", r=16, alpha=8.0),
}


def torch_unet(tiny: Tiny, unet) -> np.ndarray:
    with torch.no_grad():
        out = unet(tiny.x, tiny.t, tiny.context, added_cond_kwargs=tiny.added).sample
    return to_numpy(out).transpose(0, 2, 3, 1)


def torch_text(tiny: Tiny, encoder) -> np.ndarray:
    with torch.no_grad():
        return to_numpy(encoder(tiny.ids, output_hidden_states=True).hidden_states[-2])


def compare(tiny: Tiny, reference: dict[str, torch.nn.Module], what: str) -> float:
    errors = [assert_close(tiny.our_unet(), torch_unet(tiny, reference["unet"]), TOL, f"{what} unet")]
    for name in tiny.text_names():
        errors.append(assert_close(tiny.our_text(name), torch_text(tiny, reference[name]), TOL, f"{what} {name}"))
    print(f"{what}: max error {max(errors):.1e}")
    return max(errors)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loha_lokr_match_peft_on_linears_and_convs(tiny1, tmp_path, name):
    network = PeftNetwork(tiny1, CONFIGS[name], seed=3, std=0.5 if CONFIGS[name]["kind"] == "loha" else 0.4)
    forms = _forms(network)
    path = save_kohya(tmp_path / "net.safetensors", network.state())
    lora = read_lora(path, tiny1.targets)
    assert {c: len(v) for c, v in lora.layers.items()} == {p: len(v) for p, v in network.layers.items()}
    before = tiny1.our_unet(), tiny1.our_text("text_encoder")
    state = LoRAState()
    for strength in (1.0, -0.6):
        state.apply(lora_networks(tiny1.ours), [AppliedLoRA(lora, strength)])
        compare(tiny1, network.merged(strength), f"{name} ({', '.join(sorted(forms))}) x{strength}")
    # The network changes what is compared (parity is not met trivially).
    assert not np.allclose(tiny1.our_unet(), before[0], atol=1e-2)
    assert not np.allclose(tiny1.our_text("text_encoder"), before[1], atol=1e-2)
    state.clear(lora_networks(tiny1.ours))
    assert np.array_equal(tiny1.our_unet(), before[0]) and np.array_equal(tiny1.our_text("text_encoder"), before[1])


def _forms(network: PeftNetwork) -> set[str]:
    """Which LyCORIS forms the file holds (each config must exercise the ones its comment promises)."""
    forms = set()
    for layers in network.layers.values():
        for layer in layers.values():
            roles = set(network.tensors(layer))
            conv = layer.get_base_layer().weight.ndim == 4
            names = sorted(r.removeprefix("hada_").removeprefix("lokr_") for r in roles)
            forms.add(("conv " if conv else "linear ") + "+".join(names))
    return forms


# --- A1111's formulas, transcribed (extensions-builtin/Lora) ----------------------------------------------------


def a1111_updown(weight: torch.Tensor, t: dict[str, torch.Tensor], multiplier: float):
    """(updown, ex_bias) of one layer as network_lora.py / network_hada.py (without Tucker cores) / network_full.py
    calc_updown and network.py finalize_updown compute them, for the current `weight` (torch layout)."""
    alpha = t["alpha"].item() if "alpha" in t else None
    ex_bias, dim = None, None
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        dim = down.shape[0]
        output_shape = [up.size(0), down.size(1)]
        if "lora_mid.weight" in t:  # lyco_helpers.rebuild_cp_decomposition
            mid = t["lora_mid.weight"]
            flat_up, flat_down = up.reshape(up.size(0), -1), down.reshape(down.size(0), -1)
            updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, flat_up, flat_down)
            output_shape += mid.shape[2:]
        else:  # lyco_helpers.rebuild_conventional
            if len(down.shape) == 4:
                output_shape += down.shape[2:]
            updown = (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(output_shape)
    elif "hada_w1_a" in t:  # network_hada, rebuild_conventional for each pair
        w1a, w1b, w2a, w2b = (t[f"hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
        dim = w1b.shape[0]
        output_shape = [w1a.size(0), w1b.size(1), *w1b.shape[2:]]
        updown = ((w1a.reshape(w1a.size(0), -1) @ w1b.reshape(dim, -1)).reshape(output_shape)
                  * (w2a.reshape(w2a.size(0), -1) @ w2b.reshape(w2b.size(0), -1)).reshape(output_shape))  # fmt: skip
    else:  # network_full
        updown, output_shape = t["diff"], t["diff"].shape
        ex_bias = t.get("diff_b")
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if weight.numel() == updown.numel():
        updown = updown.reshape(weight.shape)
    if ex_bias is not None:
        ex_bias = ex_bias * multiplier
    if "scale" in t:  # calc_scale: the layer's .scale first
        updown = updown * t["scale"].item()
    else:
        updown = updown * (alpha / dim if dim is not None and alpha is not None else 1.0)
    if "dora_scale" in t:  # apply_weight_decompose
        merged = updown + weight
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1))  # fmt: skip
        updown = merged * (t["dora_scale"] / norm) - weight
    return updown * multiplier, ex_bias


def a1111_apply(model: torch.nn.Module, files: list[tuple[dict[str, dict], float]]) -> torch.nn.Module:
    """A copy of `model` with each network (module path -> role -> tensor) added in order, as
    network_apply_weights does: every network sees the weight the ones before it left."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for modules, multiplier in files:
            for path, tensors in modules.items():
                module = model.get_submodule(path)
                t = {role: torch.from_numpy(np.asarray(v, np.float32)) for role, v in tensors.items()}
                updown, ex_bias = a1111_updown(module.weight, t, multiplier)
                module.weight += updown
                if ex_bias is not None:
                    if module.bias is None:
                        module.bias = torch.nn.Parameter(ex_bias.clone())
                    else:
                        module.bias += ex_bias
    return model


def dora_networks(model: torch.nn.Module, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """kohya LoRA / LoCon layers (3x3 downs on convolutions) with alpha and a dora_scale on every one: the input
    columns' norms of the weight times 0.5..1.5, shaped (1, in) or (1, in, 1, 1) as LyCORIS saves them."""
    rng = np.random.default_rng(seed)
    targets = ["to_q", "to_k", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj", "q_proj", "fc2"]
    out = {}
    for i, (path, (down, up, _)) in enumerate(random_lora_tensors(model, targets, 4, seed).items()):
        weight = model.get_submodule(path).weight.detach().numpy()
        norms = np.linalg.norm(weight.swapaxes(0, 1).reshape(weight.shape[1], -1), axis=1)
        magnitude = (norms * rng.uniform(0.5, 1.5, norms.shape)).reshape(1, -1, *[1] * (weight.ndim - 2))
        out[path] = {"lora_down.weight": down, "lora_up.weight": up, "alpha": np.array(1.0 + i % 5, np.float32),
                     "dora_scale": magnitude.astype(np.float32)}  # fmt: skip
    return out


def tucker_and_full_networks(model: torch.nn.Module, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Tucker LoCon (lora_mid) on 3x3 convolutions; full networks (diff, diff_b) on a Linear without bias (to_v: the
    bias appears), Linears and 1x1 / 3x3 convolutions with one; an alpha beside a diff, which A1111 ignores."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3) and path.endswith(("conv2", "conv_in")):
            r = 3
            out[path] = {"lora_down.weight": rng.normal(0, 0.3, (r, module.in_channels, 1, 1)),
                         "lora_mid.weight": rng.normal(0, 0.3, (r, r, 3, 3)),
                         "lora_up.weight": rng.normal(0, 0.3, (module.out_channels, r, 1, 1)),
                         "alpha": np.array(2.0)}  # fmt: skip
        elif path.endswith(("attn1.to_v", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "linear_2")):
            weight = module.weight.detach().numpy()
            out[path] = {"diff": rng.normal(0, 0.5, weight.shape) * np.abs(weight).mean(),
                         "diff_b": rng.normal(0, 0.1, weight.shape[0]), "alpha": np.array(7.0)}  # fmt: skip
    return out


def save_networks(path, networks: dict[str, dict[str, dict]]) -> object:
    """Save {prefix: {module path: {role: tensor}}} with kohya keys in diffusers naming, float32."""
    state = {}
    for prefix, modules in networks.items():
        for module, roles in modules.items():
            key = f"{prefix}_{module.replace('.', '_')}"
            state |= {f"{key}.{role}": np.asarray(v, np.float32) for role, v in roles.items()}
    return save_kohya(path, state)


def test_dora_tucker_and_full_match_a1111_at_two_strengths(tiny1, tmp_path):
    unet, text = tiny1.parts["unet"], tiny1.parts["text_encoder"]
    dora_unet, dora_text = dora_networks(unet, seed=1), dora_networks(text, seed=2)
    assert any(v["lora_down.weight"].shape[2:] == (3, 3) for v in dora_unet.values())  # LoCon convs with DoRA
    other = tucker_and_full_networks(unet, seed=3)
    assert any("lora_mid.weight" in v for v in other.values()) and any("diff" in v for v in other.values())
    assert unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v").bias is None
    dora_file = read_lora(save_networks(tmp_path / "dora.safetensors", {"lora_unet": dora_unet, "lora_te": dora_text}),
                          tiny1.targets)  # fmt: skip
    other_file = read_lora(save_networks(tmp_path / "other.safetensors", {"lora_unet": other}), tiny1.targets)
    before = tiny1.our_unet(), tiny1.our_text("text_encoder")
    state = LoRAState()
    for strengths in ((1.0, 0.7), (-0.5, 1.6)):
        state.apply(lora_networks(tiny1.ours), [AppliedLoRA(other_file, strengths[0]),
                                                 AppliedLoRA(dora_file, strengths[1])])  # fmt: skip
        reference = {"unet": a1111_apply(unet, [(other, strengths[0]), (dora_unet, strengths[1])]),
                     "text_encoder": a1111_apply(text, [(dora_text, strengths[1])])}  # fmt: skip
        compare(tiny1, reference, f"DoRA LoRA/LoCon x{strengths[1]} after Tucker LoCon + full x{strengths[0]}")
    # DoRA is not linear in the strength: half the strength is not half the change.
    state.apply(lora_networks(tiny1.ours), [AppliedLoRA(dora_file, 0.5)])
    half = tiny1.our_unet() - before[0]
    state.apply(lora_networks(tiny1.ours), [AppliedLoRA(dora_file, 1.0)])
    assert not np.allclose(2 * half, tiny1.our_unet() - before[0], atol=1e-3)
    state.clear(lora_networks(tiny1.ours))
    to_v = dict(tiny1.ours.unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"]
    assert "bias" not in to_v  # the bias diff_b added is taken away again
    assert np.array_equal(tiny1.our_unet(), before[0]) and np.array_equal(tiny1.our_text("text_encoder"), before[1])


def test_scale_key_replaces_alpha_over_rank_as_a1111_reads_it(tiny1, tmp_path):
    """A1111's NetworkModule reads a layer's `.scale` tensor and calc_scale returns it before alpha / dim: on a LoRA
    (alpha present and ignored), a LoCon, a LoHa, a full network (the diff scaled, diff_b not) and under DoRA."""
    unet = tiny1.parts["unet"]
    networks = {path: {**t, "scale": np.array(0.3 + 0.1 * i)}
                for i, (path, t) in enumerate(dora_networks(unet, seed=8).items()) if i % 2}  # fmt: skip
    networks |= {path: {k: v for k, v in t.items() if k != "dora_scale"} | {"scale": np.array(1.7)}
                 for path, t in dora_networks(unet, seed=9).items() if path.endswith(("conv1", "to_k"))}  # fmt: skip
    rng = np.random.default_rng(10)
    for path in ("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", "conv_in"):
        o, i, *k = unet.get_submodule(path).weight.shape
        w1a, w2a = (rng.normal(0, 0.4, (o, 2)) for _ in range(2))
        w1b, w2b = (rng.normal(0, 0.4, (2, i * math.prod(k))) for _ in range(2))
        networks[path] = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                          "alpha": np.array(4.0), "scale": np.array(0.25)}  # fmt: skip
    full = tucker_and_full_networks(unet, seed=11)
    networks |= {p: {**t, "scale": np.array(-0.8)} for p, t in full.items() if "diff" in t}
    kinds = {("dora" if "dora_scale" in t else "") + ("hada" if "hada_w1_a" in t else "diff" if "diff" in t else "lora")
             for t in networks.values()}  # fmt: skip
    assert kinds == {"doralora", "lora", "hada", "diff"}, kinds
    lora = read_lora(save_networks(tmp_path / "scale.safetensors", {"lora_unet": networks}), tiny1.targets)
    before = tiny1.our_unet()
    state = LoRAState()
    for strength in (1.0, 0.6):
        state.apply(lora_networks(tiny1.ours), [AppliedLoRA(lora, strength)])
        reference = a1111_apply(unet, [(networks, strength)])
        error = assert_close(tiny1.our_unet(), torch_unet(tiny1, reference), TOL, f".scale x{strength}")
        print(f".scale on LoRA, DoRA, LoHa and full layers x{strength}: max error {error:.1e}")
    state.clear(lora_networks(tiny1.ours))
    assert np.array_equal(tiny1.our_unet(), before)


# --- quantized models: the dense delta at run time ---------------------------------------------------------------


def test_quantized_layers_run_lycoris_and_dora_unfused(tmp_path_factory, tmp_path):
    """8-bit UNet: the quantized Linears get one dense term each (DoRA computed on the dequantized weight, the weight
    the quantized layer computes with), the convolutions stay fused. Reference: the torch UNet holding the quantized
    model's dequantized weights, with PEFT's LoHa delta and A1111's DoRA on top."""
    tiny = Tiny(tmp_path_factory.mktemp("lyco-q"), "sd1")
    quantize_model("unet", tiny.ours.unet, QuantizationConfig(bits=8, group_size=32))
    dequantized = copy.deepcopy(tiny.parts["unet"])
    with torch.no_grad():
        for path, module in tiny.ours.unet.named_modules():
            if type(module).__name__ == "QuantizedLinear":
                weight = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
                target = dequantized.get_submodule(path).weight
                target.copy_(torch.from_numpy(np.array(weight, np.float32)).reshape(target.shape))
    loha = PeftNetwork(tiny, CONFIGS["loha tucker alpha"], seed=4, std=0.5)
    loha.layers = {"unet": loha.layers["unet"]}
    dora = dora_networks(tiny.parts["unet"], seed=5)
    files = [read_lora(save_kohya(tmp_path / "loha.safetensors", loha.state()), tiny.targets),
             read_lora(save_networks(tmp_path / "dora.safetensors", {"lora_unet": dora}), tiny.targets)]  # fmt: skip
    before = tiny.our_unet()
    state = LoRAState()
    state.apply(lora_networks(tiny.ours), [AppliedLoRA(files[0], 0.8), AppliedLoRA(files[1], 0.6)])
    reference = copy.deepcopy(dequantized)
    with torch.no_grad():
        for path, layer in loha.layers["unet"].items():
            reference.get_submodule(path).weight += 0.8 * layer.get_delta_weight("default")
    reference = a1111_apply(reference, [(dora, 0.6)])
    error = assert_close(tiny.our_unet(), torch_unet(tiny, reference), TOL, "8-bit LoHa + DoRA")
    wrapped = [m for _, m in tiny.ours.unet.named_modules() if isinstance(m, LoRALinear)]
    print(f"8-bit UNet, LoHa x0.8 + DoRA x0.6 unfused on {len(wrapped)} quantized layers: max error {error:.1e}")
    assert wrapped and all(m.dense and not m.downs for m in wrapped)
    state.clear(lora_networks(tiny.ours))
    assert np.array_equal(tiny.our_unet(), before)
    assert not [m for _, m in tiny.ours.unet.named_modules() if isinstance(m, LoRALinear)]


# --- end to end: <lora:name:0.8> in a prompt --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_prompt_tag_image_equals_the_peft_merged_model_and_unloads_exactly(request, kind, tmp_path):
    tiny = request.getfixturevalue("tiny1" if kind == "sd1" else "tinyxl")
    folder = tmp_path / "loras"
    folder.mkdir()
    networks = {"hadamard": PeftNetwork(tiny, CONFIGS["loha tucker alpha"], seed=6, std=0.5),
                "kronecker": PeftNetwork(tiny, CONFIGS["lokr factored tucker"], seed=7, std=0.4)}  # fmt: skip
    for name, network in networks.items():
        save_kohya(folder / f"{name}.safetensors", network.state())
    ours = Pipeline(tiny.ours, lora_resolver=LoraLibrary(folder))
    kwargs = dict(width=64, height=64, steps=3, guidance=5.0, sampler="EulerDiscreteScheduler", seed=11)
    plain = ours.generate(prompt="a boat", **kwargs)
    for name, network in networks.items():
        got = ours.generate(prompt=f"a boat <lora:{name}:0.8>", **kwargs)
        merged = {**tiny.parts, **network.merged(0.8)}
        reference = Pipeline(StableDiffusion(mlx_folder(merged, tmp_path / name, kind)))
        expected = reference.generate(prompt="a boat ", **kwargs)
        a, b = (np.asarray(r.images[0], np.float32) / 255 for r in (got, expected))
        value = psnr(a, b, data_range=1.0)
        print(f"{kind} image with <lora:{name}:0.8> ({network.kind}) vs the PEFT-merged model: PSNR {value:.1f} dB, "
              f"max pixel difference {np.abs(a - b).max() * 255:.0f}/255")  # fmt: skip
        assert value >= MIN_PSNR
        assert psnr(a, np.asarray(plain.images[0], np.float32) / 255, data_range=1.0) < 40  # the network shows
    again = ours.generate(prompt="a boat", **kwargs)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(plain.images[0]))


# --- refusals ---------------------------------------------------------------------------------------------------


def test_unsupported_networks_and_misfits_are_refused_by_name(tiny1, tmp_path):
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # (32, 32, 3, 3)
    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # (32, 32)
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    loha = {f"{linear}.hada_w1_a": z(32, 2), f"{linear}.hada_w1_b": z(2, 32), f"{linear}.hada_w2_a": z(32, 2),
            f"{linear}.hada_w2_b": z(2, 32)}  # fmt: skip
    cases = {
        "ia3": ({f"{linear}.weight": z(32), f"{linear}.on_input": z()}, r"does not apply \(IA3: "),
        "glora": ({f"{linear}.a1.weight": z(2, 32), f"{linear}.a2.weight": z(32, 2), f"{linear}.b1.weight": z(2, 32),
                   f"{linear}.b2.weight": z(32, 2)}, r"does not apply \(GLoRA: "),
        "oft": ({f"{linear}.oft_blocks": z(4, 8, 8), f"{linear}.alpha": z()}, r"does not apply \(OFT/BOFT: "),
        "peft loha": ({"unet.conv_in.hada_w1_a": z(4, 2)}, "LyCORIS tensors under diffusers/PEFT names"),
        "lokr t1": ({f"{conv}.lokr_t1": z(1, 1, 3, 3)}, "does not apply"),
        "dora per output beside a diff": ({f"{linear}.diff": z(32, 32), f"{linear}.dora_scale": z(32, 1) + 1},
                                          "dora_scale per output channel beside a full network"),
        "dora shape": ({**loha, f"{linear}.dora_scale": z(2, 32) + 1},
                       r"dora_scale \(2, 32\) is neither one magnitude per output channel \(32, 1\) nor"),
        "dora without its unit axes": ({**loha, f"{linear}.dora_scale": z(32) + 1}, r"dora_scale \(32,\) is neither"),
        "scale of two numbers": ({**loha, f"{linear}.scale": z(2)}, r"scale \(2,\) is not one number"),
        "two kinds": ({**loha, f"{linear}.lora_down.weight": z(2, 32), f"{linear}.lora_up.weight": z(32, 2)},
                      "a LoRA with hada_w1_a"),
        "w1 twice": ({f"{linear}.lokr_w1": z(4, 4), f"{linear}.lokr_w1_a": z(4, 1), f"{linear}.lokr_w1_b": z(1, 4),
                      f"{linear}.lokr_w2": z(8, 8)}, "both lokr_w1 and its factors"),
        "kron misfit": ({f"{linear}.lokr_w1": z(4, 4), f"{linear}.lokr_w2": z(8, 4)},
                        r"kron\(w1, w2\) makes \(32, 16\)"),
        "loha misfit": ({**loha, f"{linear}.hada_w2_b": z(2, 31)}, r"w2 makes \(32, 31\)"),
        "tucker core": ({**{k.replace(linear, conv): v for k, v in loha.items()}, f"{conv}.hada_t1": z(3, 2, 3, 3)},
                        "Tucker core"),
        "mid on a linear": ({f"{linear}.lora_down.weight": z(2, 32), f"{linear}.lora_mid.weight": z(2, 2, 3, 3),
                             f"{linear}.lora_up.weight": z(32, 2)}, "3x3 convolution, the layer a Linear"),
        "diff_b": ({f"{linear}.diff": z(32, 32), f"{linear}.diff_b": z(31)}, "diff_b .* not the layer's bias"),
    }  # fmt: skip
    for name, (state, message) in cases.items():
        with pytest.raises(ConversionError, match=message):
            read_lora(save_kohya(tmp_path / f"{name.replace(' ', '_')}.safetensors", state), tiny1.targets)
