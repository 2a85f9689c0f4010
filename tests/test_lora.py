"""LoRA parity with diffusers' `load_lora_weights` on tiny random-weight SD1 and SDXL models.

Random LoRAs in every dialect (tests/lora_fixtures.py): diffusers/PEFT files made by peft + diffusers, kohya/A1111
files in diffusers and original-LDM naming (.safetensors and .pt). Our UNet and text-encoder outputs with the
LoRAs applied must equal diffusers' within 1e-4 (max |ours - ref| / max |ref|), a full image within 40 dB PSNR;
unloading must restore the original outputs bit for bit; bad files are refused with errors naming the problem.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from lora_fixtures import (
    LOCON_EXTRA,
    TEXT_TARGETS,
    UNET_TARGETS,
    kohya_state,
    ldm_name,
    peft_lora,
    random_lora_tensors,
    save_kohya,
)
from test_pipeline import check, diffusers_pipe, generators
from test_sdxl_pipeline import xl_pipe
from tiny_pipelines import mlx_folder, tiny_components

from mlx_sd.lora import AppliedLoRA, LoRAState, lora_networks, lora_targets, parse_lora_tags
from mlx_sd.model import StableDiffusion
from mlx_sd.pipeline import Pipeline
from mlx_sd.quantization import QuantizationConfig, quantize_model
from mlx_sd_convert import ConversionError
from mlx_sd_convert.library import LoraLibrary
from mlx_sd_convert.lora import lora_hash, parse_lora_spec, read_lora
from mlx_sd_convert.readers import UnsafeCheckpointError
from oracles import assert_close, nchw_to_nhwc, to_numpy

TOL = 1e-4


class Tiny:
    """A tiny model as diffusers components, our converted model, and a diffusers pipeline over the same parts."""

    def __init__(self, tmp, kind):
        self.kind = kind
        self.tmp = tmp
        self.parts = tiny_components(tmp, kind)
        self.ours = StableDiffusion(mlx_folder(self.parts, tmp / "mlx", kind))
        if kind == "sdxl":
            self.pipe = xl_pipe("StableDiffusionXLPipeline", self.parts, "EulerDiscreteScheduler")
        else:
            self.pipe = diffusers_pipe("StableDiffusionPipeline", self.parts, "EulerDiscreteScheduler")
        self.targets = lora_targets(self.ours)
        g = torch.Generator().manual_seed(7)
        unet = self.parts["unet"]
        ctx_dim = unet.config.cross_attention_dim
        self.x = torch.randn(2, 4, 8, 8, generator=g)
        self.t = torch.tensor([500.0, 20.0])
        self.context = torch.randn(2, 77, ctx_dim, generator=g)
        self.added = None
        if kind == "sdxl":
            self.added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.tensor([[64.0] * 6] * 2)}
        self.ids = torch.tensor([[49406, 320, 1125, 539, 3309, 49407] + [49407] * 71] * 2)

    def ref_unet(self) -> np.ndarray:
        with torch.no_grad():
            out = self.pipe.unet(self.x, self.t, self.context, added_cond_kwargs=self.added).sample
        return to_numpy(out).transpose(0, 2, 3, 1)

    def our_unet(self) -> np.ndarray:
        pooled = time_ids = None
        if self.added is not None:
            pooled, time_ids = mx.array(self.added["text_embeds"].numpy()), mx.array(self.added["time_ids"].numpy())
        out = self.ours.unet(nchw_to_nhwc(self.x), mx.array(self.t.numpy()), mx.array(self.context.numpy()), pooled,
                             time_ids)  # fmt: skip
        return np.array(out)

    def ref_text(self, name: str) -> np.ndarray:
        with torch.no_grad():
            return to_numpy(getattr(self.pipe, name)(self.ids, output_hidden_states=True).hidden_states[-2])

    def our_text(self, name: str) -> np.ndarray:
        encoder = lora_networks(self.ours)[name]
        return np.array(encoder(mx.array(self.ids.numpy())).hidden_states[-2])

    def text_names(self):
        return ["text_encoder", "text_encoder_2"] if self.kind == "sdxl" else ["text_encoder"]

    def compare(self, what: str):
        errors = [assert_close(self.our_unet(), self.ref_unet(), TOL, f"{what} unet")]
        errors += [assert_close(self.our_text(n), self.ref_text(n), TOL, f"{what} {n}") for n in self.text_names()]
        print(f"{what}: max error {max(errors):.1e}")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("lora-sd1"), "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("lora-sdxl"), "sdxl")


def kohya_file(tiny: Tiny, path, seed: int, naming: str = "diffusers", rank: int = 4, text: bool = True,
               unet_targets=UNET_TARGETS + LOCON_EXTRA):  # fmt: skip
    parts = tiny.parts
    unet = random_lora_tensors(parts["unet"], unet_targets, rank, seed)
    rename = lambda p: p  # noqa: E731
    if naming == "diffusers" and tiny.kind == "sdxl":
        # diffusers 0.42 mangles lora_unet_add_embedding_linear_1 (-> "add.embedding.linear"): not a reference there.
        unet = {p: v for p, v in unet.items() if not p.startswith("add_embedding.")}
    if naming == "ldm":
        config = parts["unet"].config
        attention = tuple(i for i, t in enumerate(config.down_block_types) if t.startswith("CrossAttn"))
        n = len(config.block_out_channels)
        unet = {p: v for p, v in unet.items() if not (p.startswith("up_blocks.") and ".upsamplers." in p)
                or tiny.kind == "sdxl"}  # fmt: skip
        rename = lambda p: ldm_name(p, n, config.layers_per_block, attention)  # noqa: E731
    state = kohya_state(unet, "lora_unet", rename)
    if text:
        prefixes = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"} if tiny.kind == "sdxl" else {
            "text_encoder": "lora_te"}  # fmt: skip
        for i, (enc, prefix) in enumerate(prefixes.items()):
            tensors = random_lora_tensors(parts[enc], TEXT_TARGETS, rank, seed + 1 + i)
            # kohya names text towers as transformers' CLIPTextModel: text_model.encoder.layers...
            state |= kohya_state(tensors, prefix, lambda p: p if p.startswith("text_model.") else f"text_model.{p}")
    return save_kohya(path, state)


def load_both(tiny: Tiny, files_weights, fuse: float | None = None):
    """Load LoRAs into diffusers (adapters with weights) and ours; returns our LoRAState for unloading."""
    names = []
    for i, (path, _) in enumerate(files_weights):
        tiny.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"a{i}")
        names.append(f"a{i}")
    if fuse is None:
        tiny.pipe.set_adapters(names, [w for _, w in files_weights])
    else:
        tiny.pipe.fuse_lora(lora_scale=fuse)
    state = LoRAState()
    applied = [AppliedLoRA(read_lora(p, tiny.targets), w if fuse is None else fuse) for p, w in files_weights]
    state.apply(lora_networks(tiny.ours), applied)
    return state


def unload_both(tiny: Tiny, state: LoRAState, fused: bool = False):
    if fused:
        tiny.pipe.unfuse_lora()
    tiny.pipe.unload_lora_weights()
    state.clear(lora_networks(tiny.ours))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_peft_lora_matches_diffusers_and_unloads_exactly(request, kind, tmp_path):
    tiny = request.getfixturevalue(kind)
    before = tiny.our_unet(), [tiny.our_text(n) for n in tiny.text_names()]
    path = peft_lora(tiny.parts, tmp_path, seed=1)
    state = load_both(tiny, [(path, 0.7)])
    tiny.compare(f"{kind} peft x0.7")
    # The LoRA does change every output compared (parity is not met trivially).
    assert not np.allclose(tiny.our_unet(), before[0], atol=1e-3)
    assert not any(np.allclose(tiny.our_text(n), b, atol=1e-3) for n, b in zip(tiny.text_names(), before[1]))
    unload_both(tiny, state)
    assert np.array_equal(tiny.our_unet(), before[0])
    assert all(np.array_equal(tiny.our_text(n), b) for n, b in zip(tiny.text_names(), before[1]))


@pytest.mark.parametrize(
    "kind,naming,suffix",
    [
        ("sd1", "diffusers", ".safetensors"),
        ("sd1", "diffusers", ".pt"),
        ("sdxl", "ldm", ".safetensors"),
        ("sdxl", "diffusers", ".safetensors"),
    ],
)
def test_kohya_lora_matches_diffusers(request, kind, naming, suffix, tmp_path):  # fmt: skip
    tiny = request.getfixturevalue(kind)
    path = kohya_file(tiny, tmp_path / f"k{suffix}", seed=3, naming=naming)
    if suffix == ".pt":  # diffusers reads only safetensors/bin by name; ours reads the .pt through the safe reader
        reference = kohya_file(tiny, tmp_path / "k.safetensors", seed=3, naming=naming)
        tiny.pipe.load_lora_weights(str(tmp_path), weight_name=reference.name, adapter_name="a0")
        tiny.pipe.set_adapters(["a0"], [0.9])
        state = LoRAState()
        state.apply(lora_networks(tiny.ours), [AppliedLoRA(read_lora(path, tiny.targets), 0.9)])
    else:
        state = load_both(tiny, [(path, 0.9)])
    tiny.compare(f"{kind} kohya {naming} names{suffix}")
    unload_both(tiny, state)


def test_several_loras_with_weights_and_fuse(sdxl, tmp_path):
    a = peft_lora(sdxl.parts, tmp_path / "a", seed=5, alpha=8.0)
    b = kohya_file(sdxl, tmp_path / "b.safetensors", seed=6, naming="ldm")
    state = load_both(sdxl, [(a, 0.6), (b, -0.4)])
    sdxl.compare("sdxl peft x0.6 + kohya x-0.4")
    unload_both(sdxl, state)
    state = load_both(sdxl, [(a, 1.0)], fuse=0.5)
    sdxl.compare("sdxl fuse_lora(lora_scale=0.5)")
    unload_both(sdxl, state, fused=True)


def test_original_ldm_names_equal_diffusers_names_on_sd1(sd1, tmp_path):
    """SD1 LoRAs in original naming (A1111/LyCORIS) have no diffusers loader; they must mean the same layers as the
    diffusers-named file that diffusers loads (checked above), including the no-attention stage's upsampler."""
    targets = UNET_TARGETS + LOCON_EXTRA
    tensors = random_lora_tensors(sd1.parts["unet"], targets, 4, seed=9)
    config = sd1.parts["unet"].config
    attention = tuple(i for i, t in enumerate(config.down_block_types) if t.startswith("CrossAttn"))
    ldm = kohya_state(tensors, "lora_unet", lambda p: ldm_name(p, 2, config.layers_per_block, attention))
    plain = kohya_state(tensors, "lora_unet")
    a = read_lora(save_kohya(tmp_path / "ldm.safetensors", ldm), sd1.targets)
    b = read_lora(save_kohya(tmp_path / "plain.safetensors", plain), sd1.targets)
    assert "up_blocks.0.upsamplers.0.conv" in a.layers["unet"]
    assert a.layers["unet"].keys() == b.layers["unet"].keys()
    for path, layer in a.layers["unet"].items():
        assert np.array_equal(np.array(layer.delta()), np.array(b.layers["unet"][path].delta())), path


def test_pipeline_prompt_syntax_image_matches_diffusers_and_switches_without_reload(sd1, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    peft_lora(sd1.parts, folder, seed=11)
    (folder / "pytorch_lora_weights.safetensors").rename(folder / "ink.safetensors")
    kohya_file(sd1, folder / "sketch.safetensors", seed=12)
    ours = Pipeline(sd1.ours, lora_resolver=LoraLibrary(folder))
    kwargs = dict(width=64, height=64, steps=4, guidance=6.0, sampler="EulerDiscreteScheduler", seed=21)
    plain = ours.generate(prompt="a boat", **kwargs)

    sd1.pipe.load_lora_weights(str(folder), weight_name="ink.safetensors", adapter_name="ink")
    sd1.pipe.set_adapters(["ink"], [0.8])
    expected = sd1.pipe("a boat ", width=64, height=64, num_inference_steps=4, guidance_scale=6.0,
                        generator=generators(21, 1), output_type="np").images  # fmt: skip
    sd1.pipe.unload_lora_weights()
    unet_weights = sd1.ours.unet.parameters()
    result = ours.generate(prompt="a boat <lora:ink:0.8>", **kwargs)
    check(result, expected, "SD1 image with <lora:ink:0.8>")
    text = result.infotexts[0]
    assert text.startswith("a boat <lora:ink:0.8>\n")
    assert f'Lora hashes: "ink: {lora_hash(folder / "ink.safetensors")[:12]}"' in text

    for _ in range(2):  # low-memory mode reloads clean text encoders: their LoRA deltas are applied again
        low = ours.generate(prompt="a boat <lora:ink:0.8>", low_memory=True, **kwargs)
        assert np.array_equal(np.asarray(low.images[0]), np.asarray(result.images[0]))
    other = ours.generate(prompt="a boat <lora:sketch:1>", **kwargs)  # switch: fused anew, no reload
    assert ours.model.unet is sd1.ours.unet and not np.array_equal(np.asarray(other.images[0]),
                                                                    np.asarray(result.images[0]))  # fmt: skip
    again = ours.generate(prompt="a boat", **kwargs)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(plain.images[0]))
    for (name, before), (_, after) in zip(_flat(unet_weights), _flat(sd1.ours.unet.parameters())):
        assert before is after or np.array_equal(np.array(before), np.array(after)), name


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_set_loras_from_python_is_recorded_as_a1111_does(sd1, tmp_path):
    path = kohya_file(sd1, tmp_path / "detail.safetensors", seed=13, text=False)
    ours = Pipeline(sd1.ours)
    ours.set_loras([(read_lora(path, ours.lora_targets()), 0.5)])
    result = ours.generate(prompt="a boat", width=64, height=64, steps=1, seed=1)
    assert result.infotexts[0].startswith("a boat <lora:detail:0.5>\n")
    assert f'Lora hashes: "detail: {lora_hash(path)[:12]}"' in result.infotexts[0]
    ours.set_loras([])
    ours.generate(prompt="a boat", width=64, height=64, steps=1, seed=1)
    assert not ours._lora_state.active


def test_quantized_layers_run_lora_at_run_time(tmp_path_factory, tmp_path):
    """8-bit UNet: quantized Linears get the LoRA unfused (exact low-rank math), convolutions fused; the result
    follows diffusers' LoRA output as closely as the quantized model follows the float one, and unloading restores
    the quantized model exactly."""
    tiny = Tiny(tmp_path_factory.mktemp("lora-q"), "sd1")
    quantize_model("unet", tiny.ours.unet, QuantizationConfig(bits=8, group_size=32))
    base_error = np.abs(tiny.our_unet() - tiny.ref_unet()).max() / np.abs(tiny.ref_unet()).max()
    before = tiny.our_unet()
    state = load_both(tiny, [(peft_lora(tiny.parts, tmp_path, seed=2, text=False), 0.8)])
    error = np.abs(tiny.our_unet() - tiny.ref_unet()).max() / np.abs(tiny.ref_unet()).max()
    print(f"8-bit: error without LoRA {base_error:.1e}, with LoRA {error:.1e}")
    wrapped = [p for p, m in tiny.ours.unet.named_modules() if type(m).__name__ == "LoRALinear"]
    assert wrapped and error < max(4 * base_error, 1e-3)
    unload_both(tiny, state)
    assert np.array_equal(tiny.our_unet(), before)
    assert not [p for p, m in tiny.ours.unet.named_modules() if type(m).__name__ == "LoRALinear"]


# --- refusals -------------------------------------------------------------------------------------------------


def test_sd1_lora_on_sdxl_is_refused_naming_the_family(sd1, sdxl, tmp_path):
    path = kohya_file(sd1, tmp_path / "sd1.safetensors", seed=4)
    with pytest.raises(ConversionError, match="for SD1/SD2 models .* the model is sdxl"):
        read_lora(path, sdxl.targets)
    xl = peft_lora(sdxl.parts, tmp_path / "xl", seed=4)
    with pytest.raises(ConversionError, match="for SDXL .* the model is sd1"):
        read_lora(xl, sd1.targets)


def test_unknown_unmatched_and_other_network_keys_are_named(sd1, tmp_path):
    base = kohya_state(random_lora_tensors(sd1.parts["unet"], ["to_q"], 2, 0), "lora_unet")
    cases = {
        "unknown": ({"some_weird_tensor": np.zeros(3, np.float32)}, r"not LoRA keys .*some_weird_tensor"),
        "unmatched": ({"lora_unet_down_blocks_9_attn_to_q.lora_down.weight": np.zeros((2, 32), np.float32)},
                      "name no layer of this model .*down_blocks_9"),
        "oft": ({"lora_unet_conv_in.oft_blocks": np.zeros((4, 2, 2), np.float32)}, "not apply .*OFT/BOFT"),
        "half a loha": ({"lora_unet_conv_in.hada_w1_a": np.zeros((4, 2), np.float32)}, "lack .*LoHa's four hada_w"),
    }  # fmt: skip
    for name, (extra, message) in cases.items():
        with pytest.raises(ConversionError, match=message):
            read_lora(save_kohya(tmp_path / f"{name}.safetensors", {**base, **extra}), sd1.targets)
    no_up = {k: v for k, v in base.items() if "lora_up" not in k or "attentions_0_transformer_blocks_0_attn1" not in k}
    with pytest.raises(ConversionError, match="lack a down or up"):
        read_lora(save_kohya(tmp_path / "noup.safetensors", no_up), sd1.targets)
    key = next(k for k in base if k.endswith("lora_down.weight"))
    wrong = {**base, key: np.zeros((2, 31), np.float32)}
    with pytest.raises(ConversionError, match="wrong shape"):
        read_lora(save_kohya(tmp_path / "shape.safetensors", wrong), sd1.targets)


def test_hostile_and_broken_files_are_refused_without_running_code(sd1, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"lora_unet_conv_in.lora_down.weight": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_lora(tmp_path / "evil.pt", sd1.targets)
    assert not marker.exists()
    (tmp_path / "page.safetensors").write_text("<!DOCTYPE html><html>login</html>")
    with pytest.raises(ConversionError, match="HTML page"):
        read_lora(tmp_path / "page.safetensors", sd1.targets)
    good = kohya_file(sd1, tmp_path / "good.safetensors", seed=1, text=False)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ConversionError, match="truncated|corrupt"):
        read_lora(tmp_path / "cut.safetensors", sd1.targets)


def test_prompt_tags_library_and_specs(sd1, tmp_path):
    assert parse_lora_tags("a <lora:ink:0.8> cat <lora:b> <lyco:c:0.5:0.25>") == (
        "a  cat  ",
        [parse_lora_tags("<lora:ink:0.8>")[1][0], parse_lora_tags("<lora:b:1>")[1][0],
         parse_lora_tags("<lora:c:0.5:0.25>")[1][0]],
    )  # fmt: skip
    tag = parse_lora_tags("<lora:c:0.5:0.25>")[1][0]
    assert (tag.weight, tag.text_weight) == (0.25, 0.5)  # A1111: te multiplier first, then unet
    tag = parse_lora_tags("<lora:c:unet=0.3:te=0.6>")[1][0]
    assert (tag.weight, tag.text_weight) == (0.3, 0.6)
    for bad in ("<hypernet:x:1>", "<lora:x:strong>", "<lora::1>", "<lora:x:dyn=4>"):
        with pytest.raises(ValueError):
            parse_lora_tags(bad)
    assert parse_lora_spec("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert parse_lora_spec("C:/x.safetensors") == ("C:/x.safetensors", 1.0)

    (tmp_path / "sub").mkdir()
    state = kohya_state(random_lora_tensors(sd1.parts["unet"], ["to_q"], 2, 0), "lora_unet")
    save_kohya(tmp_path / "sub" / "x.safetensors", state, {"ss_output_name": "my_style"})
    library = LoraLibrary(tmp_path)
    [entry] = library.listing()
    assert entry.to_api() == {"name": "x", "alias": "my_style", "path": str(tmp_path / "sub" / "x.safetensors"),
                              "metadata": {"ss_output_name": "my_style"}}  # fmt: skip
    first = library("my_style", sd1.targets)
    assert library("x", sd1.targets) is first  # cached: switching back never re-reads the file
    with pytest.raises(ConversionError, match="not found .*available: x"):
        library("nope", sd1.targets)
    ours = Pipeline(sd1.ours)
    with pytest.raises(ValueError, match="no LoRA folder"):
        ours.generate(prompt="<lora:x:1>", width=64, height=64, steps=1)


def test_cli_lora_flags_prompt_syntax_and_embeddings(sd1, tmp_path):
    from test_cli import run

    from mlx_sd.infotext import parse_infotext, read_infotext

    folder = tmp_path / "loras"
    folder.mkdir()
    kohya_file(sd1, folder / "ink.safetensors", seed=1)
    extra = kohya_file(sd1, tmp_path / "extra.safetensors", seed=2, text=False)
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    save_kohya(embeddings / "mystyle.safetensors", {"emb_params": np.ones((2, 32), np.float32)})
    out = run("generate", "a boat in mystyle <lora:ink:0.7>", "--model", sd1.tmp / "mlx", "--width", 64, "--height",
              64, "--steps", 2, "--seed", 3, "--lora", f"{extra}:0.5", "--lora-dir", folder, "--embeddings-dir",
              embeddings, "--output", tmp_path / "out.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    prompt, _, params = parse_infotext(read_infotext(tmp_path / "out.png"))
    assert prompt == "a boat in mystyle <lora:ink:0.7> <lora:extra:0.5>"
    assert params["Lora hashes"] == f"extra: {lora_hash(extra)[:12]}, ink: {lora_hash(folder / 'ink.safetensors')[:12]}"
    assert params["TI hashes"].startswith("mystyle: ")
    for args, message in (([f"{tmp_path}/missing.safetensors:0.5"], "does not exist"), ([], "'nope' not found")):
        flags = [x for a in args for x in ("--lora", a)]
        bad = run("generate", "x <lora:nope:1>", "--model", sd1.tmp / "mlx", "--steps", 1, "--lora-dir", folder, *flags)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_original_names_on_the_original_sd1_unet_as_a1111_applies_them(tmp_path):
    """SD1 LoRAs in original naming have no diffusers loader; A1111 applies them to the original `ldm` UNet by its
    module names (dots as underscores), W += weight * alpha / rank * up @ down. Same file, same result on ours."""
    import copy
    import dataclasses

    from ldm_fixtures import check_unet_model, convert_all, original

    from mlx_sd.components import parameter_shapes
    from mlx_sd.lora import LoRATargets
    from oracles import load_ours

    orig = original("sd1")
    config, weights = convert_all(orig.state)[1]["unet"]
    ours = load_ours(config, weights)
    unet = copy.deepcopy(orig.unet)
    ldm_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "in_layers.2",
                   "out_layers.3", "emb_layers.1", "skip_connection", "op", "conv", "input_blocks.0.0", "out.2",
                   "time_embed.0"]  # fmt: skip
    tensors = random_lora_tensors(unet, ldm_targets, 4, seed=14)
    # Per-layer alphas that differ (kohya's conv_alpha vs network_alpha): each layer scales by its own alpha / rank.
    tensors = {name: (down, up, float(1 + i % 7)) for i, (name, (down, up, _)) in enumerate(tensors.items())}
    assert "output_blocks.2.1.conv" in tensors  # the upsampler of the stage without attention
    weight = 0.7
    with torch.no_grad():
        for name, (down, up, alpha) in tensors.items():
            module = unet.get_submodule(name)
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * (alpha / down.shape[0])
            module.weight += weight * torch.from_numpy(delta.reshape(module.weight.shape).astype(np.float32))
    path = save_kohya(tmp_path / "a1111.safetensors", kohya_state(tensors, "lora_unet", dtype=np.float32))
    shapes = {k[: -len(".weight")]: v for k, v in parameter_shapes(ours).items() if k.endswith(".weight")}
    lora = read_lora(path, LoRATargets("sd1", config, {"unet": shapes}))
    LoRAState().apply({"unet": ours}, [AppliedLoRA(lora, weight)])
    error = check_unet_model(dataclasses.replace(orig, unet=unet), ours)
    print(f"SD1 original-named LoRA vs A1111's rule on the ldm UNet: {error:.1e}")
