"""`convert()` end to end: published formats in, mlx-sd model folders out, proved against the references.

Every fixture is written at test time from random-weight reference models (tests/convert_fixtures.py,
tests/ldm_fixtures.py). Each conversion is loaded back the way the pipeline loads it
(`mlx_sd.components.load_component`, `CLIPTokenizer.from_folder`) and compared with the reference modules at
fp32 (max|ours - ref| / max|ref| <= 1e-4). The same weights published in two formats must convert to
byte-identical weights files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from convert_fixtures import (
    diffusers_folder_from_single_file,
    save_single_file,
    tiny_reference,
    write_diffusers_folder,
)
from ldm_fixtures import FAMILY, check_text_model, check_unet_model, check_vae_model, original

from mlx_sd.components import load_component
from mlx_sd.model import ModelInfo, StableDiffusion
from mlx_sd.tokenizer import CLIPTokenizer
from mlx_sd_convert import ConversionError, convert
from mlx_sd_convert.readers import open_checkpoint
from oracles import nchw_to_nhwc, relative_error, token_batch

FP32_TOL = 1e-4
COMPONENTS = ("unet", "vae", "text_encoder")


def weights_bytes(folder: Path, component: str) -> bytes:
    return (folder / component / "weights.safetensors").read_bytes()


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Staging folders a conversion left behind (there must be none)."""
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


# --- original single files -----------------------------------------------------------------------------------

SINGLE_FILES = [
    # kind, EMA, file, nested like a Lightning training checkpoint
    ("sd1", False, "model.safetensors", False),
    ("sd1", True, "model.ckpt", True),
    ("sd2", False, "model.safetensors", False),
    ("inpaint", False, "model.ckpt", False),
]


@pytest.mark.parametrize(
    "kind,ema,name,lightning", SINGLE_FILES, ids=[f"{k}{'-ema' if e else ''}-{n}" for k, e, n, _ in SINGLE_FILES]
)
def test_single_file_converts_and_matches_the_original_code(tmp_path, kind, ema, name, lightning):
    orig = original(kind, ema)
    src = save_single_file(tmp_path / name, orig.state, lightning=lightning, global_step=470000 if lightning else None)
    if name.endswith(".ckpt"):  # the torch-free reader reads what torch.load reads, byte for byte
        reference = torch.load(src, weights_only=True)
        reference = reference.get("state_dict", reference)
        checkpoint = open_checkpoint(src)
        assert set(checkpoint) == set(reference)
        assert all(np.array_equal(checkpoint[k], reference[k].numpy()) for k in reference)
    info = convert(src, tmp_path / "out", dtype="float32")
    out = tmp_path / "out"

    assert ModelInfo.read(out) == info
    assert info.family == FAMILY[kind] and info.dtype == "float32" and info.name == "model"
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert info.detection["ema"]["value"] is ema
    assert info.detection["in_channels"]["value"] == (9 if kind == "inpaint" else 4)
    errors = {"unet": check_unet_model(orig, load_component(out / "unet"))}
    if kind != "inpaint":
        errors["text"] = check_text_model(orig, load_component(out / "text_encoder"))
    if kind == "sd1":
        errors |= {f"vae {k}": v for k, v in check_vae_model(orig, load_component(out / "vae")).items()}
    print(f"{kind} {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))

    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    tokenizer = CLIPTokenizer.from_folder(out / "tokenizer")
    assert tokenizer.normalization == "openai"
    model = StableDiffusion(out, dtype=mx.float32)  # what the pipeline loads
    assert model.info == info and model.is_inpaint == (kind == "inpaint")
    assert model.text_encoder().encode(["a photo of a cat"])[0].context.shape == (1, 77, 128)
    if FAMILY[kind] == "sd2":  # the tiny SD2 file reads as 768-v (ComfyUI's statistic), low confidence
        assert (info.prediction_type, info.detection["prediction_type"]["confidence"]) == ("v_prediction", "low")
        assert (scheduler["_class_name"], scheduler["prediction_type"]) == ("DDIMScheduler", "v_prediction")
        assert tokenizer.pad_token_id == 0
    else:
        assert (scheduler["_class_name"], scheduler["prediction_type"]) == ("PNDMScheduler", "epsilon")
        assert tokenizer.pad_token_id == 49407


def test_sd2_epsilon_gets_the_published_512_base_scheduler(tmp_path):
    """An SD2 .ckpt with the original 512-base global step predicts epsilon; so does an override."""
    src = save_single_file(tmp_path / "base.ckpt", original("sd2").state, lightning=True, global_step=875000)
    info = convert(src, tmp_path / "out")
    assert (info.prediction_type, info.detection["prediction_type"]["confidence"]) == ("epsilon", "medium")
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["prediction_type"]) == ("PNDMScheduler", "epsilon")
    info = convert(src, tmp_path / "v", prediction_type="v")
    assert (info.prediction_type, info.detection["prediction_type"]["confidence"]) == ("v_prediction", "override")


def test_fp16_files_safetensors_and_ckpt_convert_identically(tmp_path):
    """The same fp16 weights as .safetensors and .ckpt give identical weights files, equal to the fp32 file
    converted to float16 (one rounding, the same as torch's)."""
    orig = original("sd1")
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in orig.state.items()}
    outs = {}
    for name in ("half.safetensors", "half.ckpt"):
        info = convert(save_single_file(tmp_path / name, half), tmp_path / name.replace(".", "-"))
        assert info.dtype == "float16" and info.detection["dtype"]["value"] == "float16"
        outs[name] = tmp_path / name.replace(".", "-")
    convert(save_single_file(tmp_path / "full.safetensors", orig.state), tmp_path / "full", dtype="float16")
    for component in COMPONENTS:
        reference = weights_bytes(tmp_path / "full", component)
        assert all(weights_bytes(out, component) == reference for out in outs.values()), component


def test_bfloat16_output(tmp_path):
    orig = original("sd1")
    convert(save_single_file(tmp_path / "m.safetensors", orig.state), tmp_path / "out", dtype="bfloat16")
    unet = load_component(tmp_path / "out" / "unet")
    assert unet.conv_in.weight.dtype == mx.bfloat16
    reference = torch.from_numpy(orig.state["model.diffusion_model.input_blocks.0.0.weight"]).bfloat16()
    expected = reference.permute(0, 2, 3, 1).float().numpy()
    assert np.array_equal(np.array(unet.conv_in.weight.astype(mx.float32)), expected)


def test_weights_files_are_read_alike_by_safetensors_and_mlx(tmp_path):
    """The streaming writer's files: the safetensors library and mx.load read the same tensors."""
    from safetensors import safe_open

    src = save_single_file(tmp_path / "m.safetensors", original("sd1").state)
    for options in ({"dtype": "float16", "quantize": 8}, {"dtype": "bfloat16"}):
        out = tmp_path / "-".join(map(str, options.values()))
        convert(src, out, **options)
        for component in COMPONENTS:
            path = out / component / "weights.safetensors"
            ours = mx.load(str(path))
            with safe_open(path, framework="pt") as f:
                assert f.metadata() == {"format": "mlx"} and set(f.keys()) == set(ours)
                for key in f.keys():
                    theirs = f.get_tensor(key)
                    mine = ours[key]
                    if theirs.dtype == torch.bfloat16:
                        theirs, mine = theirs.float(), mine.astype(mx.float32)
                    assert np.array_equal(theirs.numpy(), np.array(mine)), key


# --- diffusers folders ---------------------------------------------------------------------------------------


def diffusers_errors(ref, out: Path) -> dict[str, float]:
    """Our loaded folder against the diffusers / transformers modules on the same inputs (relative errors)."""
    unet, vae, text = (load_component(out / c) for c in COMPONENTS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 8, generator=g)
    t = torch.tensor([999.0, 17.5])
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    image = torch.rand(2, 3, 32, 24, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 8, 6, generator=g)
    ids = token_batch(49407)
    with torch.no_grad():
        expected = ref.unet(x, t, encoder_hidden_states=context).sample
        dist = ref.vae.encode(image).latent_dist
        decoded = ref.vae.decode(latents).sample
        hidden = ref.text(input_ids=torch.from_numpy(ids)).last_hidden_state
    got = unet(nchw_to_nhwc(x), mx.array(t.numpy()), mx.array(context.numpy()))
    encoded = vae.encode(nchw_to_nhwc(image))
    return {
        "unet": relative_error(got, nchw_to_nhwc(expected)),
        "vae mean": relative_error(encoded.mean, nchw_to_nhwc(dist.mean)),
        "vae logvar": relative_error(encoded.logvar, nchw_to_nhwc(dist.logvar)),
        "vae decode": relative_error(vae.decode(nchw_to_nhwc(latents)), nchw_to_nhwc(decoded)),
        "text": relative_error(text(mx.array(ids)).last_hidden_state, hidden),
    }


def check_diffusers_outputs(ref, out: Path, components=("unet", "vae", "text")) -> dict[str, float]:
    errors = diffusers_errors(ref, out)
    for name, error in errors.items():
        if name.split()[0] in components:
            assert error <= FP32_TOL, f"{name}: max|ours - ref| / max|ref| = {error:.3g} > {FP32_TOL}"
    return errors


def test_diffusers_folders_safetensors_bin_fp16_variant_and_shards(tmp_path):
    ref = tiny_reference()
    folders = {
        "safetensors": write_diffusers_folder(tmp_path / "st", ref),
        "bin": write_diffusers_folder(tmp_path / "bin", ref, safe=False),
        "sharded": write_diffusers_folder(tmp_path / "sharded", ref, max_shard_size="200KB"),
    }
    assert (folders["sharded"] / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    outs = {}
    for name, folder in folders.items():
        info = convert(folder, tmp_path / f"out-{name}", dtype="float32")
        assert (info.family, info.prediction_type, info.dtype) == ("sd1", "epsilon", "float32")
        outs[name] = tmp_path / f"out-{name}"
    errors = check_diffusers_outputs(ref, outs["safetensors"])
    print("diffusers folder: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    for component in COMPONENTS:  # .bin (text encoder in the transformers 4.x layout) and shards: same bytes
        assert weights_bytes(outs["bin"], component) == weights_bytes(outs["safetensors"], component)
        assert weights_bytes(outs["sharded"], component) == weights_bytes(outs["safetensors"], component)
    tokenizer = CLIPTokenizer.from_folder(outs["safetensors"] / "tokenizer")
    assert (tokenizer.normalization, tokenizer.pad_token_id) == ("hf", 49407)
    scheduler = json.loads((outs["safetensors"] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "PNDMScheduler"

    # fp16 variant files only: found without being asked, and equal to the fp32 weights rounded once
    fp16 = write_diffusers_folder(tmp_path / "fp16", ref, variant="fp16", half=True)
    info = convert(fp16, tmp_path / "out-fp16")
    assert (info.dtype, info.source["variant"]) == ("float16", "fp16")
    convert(folders["safetensors"], tmp_path / "out-st16", dtype="float16")
    for component in COMPONENTS:
        assert weights_bytes(tmp_path / "out-fp16", component) == weights_bytes(tmp_path / "out-st16", component)
    # both kinds of files: the variant is chosen when asked for
    both = write_diffusers_folder(tmp_path / "both", ref)
    for component in ("unet", "vae"):  # the text encoder has no fp16 file: its plain weights are used
        shutil.copy(fp16 / component / "diffusion_pytorch_model.fp16.safetensors", both / component)
    info = convert(both, tmp_path / "out-both", variant="fp16")
    assert info.source["variant"] == "fp16"
    used = set(info.source["files"])
    assert {"unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.safetensors"} <= used
    assert "unet/diffusion_pytorch_model.safetensors" not in used


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_single_file_and_diffusers_folder_of_the_same_weights_convert_identically(tmp_path, kind):
    """diffusers' own single-file loaders turn the original file into a diffusers folder; both convert to the
    same bytes (SD2: OpenCLIP's fused in_proj split, the last block dropped, on both paths)."""
    orig = original(kind)
    single = save_single_file(tmp_path / "model.safetensors", orig.state)
    folder = diffusers_folder_from_single_file(tmp_path / "folder", single, orig, FAMILY[kind])
    from_file = convert(single, tmp_path / "from-file")
    from_folder = convert(folder, tmp_path / "from-folder")
    assert from_folder.family == from_file.family == FAMILY[kind]
    for component in COMPONENTS:
        assert weights_bytes(tmp_path / "from-file", component) == weights_bytes(tmp_path / "from-folder", component)
    pad = CLIPTokenizer.from_folder(tmp_path / "from-folder" / "tokenizer").pad_token_id
    assert pad == CLIPTokenizer.from_folder(tmp_path / "from-file" / "tokenizer").pad_token_id


def test_inconsistent_sdxl_folder_is_refused(tmp_path):
    """An SD1 folder with a second (projection-less) text encoder added: recognised as SDXL, refused with the reason
    (SDXL folders convert: tests/test_sdxl_convert.py)."""
    folder = write_diffusers_folder(tmp_path / "xl", tiny_reference())
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"text_encoder_2": ["transformers", "CLIPTextModel"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    shutil.copytree(folder / "tokenizer", folder / "tokenizer_2")
    with pytest.raises(ConversionError, match=r"an SDXL folder needs text_encoder_2 with a projection"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- --vae ---------------------------------------------------------------------------------------------------


def test_vae_swap_from_a_file_and_from_a_folder(tmp_path):
    orig, other = original("sd1"), original("sd1", seed=5)
    src = save_single_file(tmp_path / "model.safetensors", orig.state)
    prefix = "first_stage_model."
    bare = {k[len(prefix) :]: v for k, v in other.state.items() if k.startswith(prefix)}
    vae_file = save_single_file(tmp_path / "vae-ft.safetensors", bare)
    info = convert(src, tmp_path / "out", vae=vae_file, dtype="float32")
    check_vae_model(other, load_component(tmp_path / "out" / "vae"))
    with pytest.raises(AssertionError):
        check_vae_model(orig, load_component(tmp_path / "out" / "vae"))
    assert info.source["vae"]["sha256"] == hashlib.sha256(vae_file.read_bytes()).hexdigest()
    assert info.detection["vae"]["value"] == "vae-ft.safetensors"

    ref = tiny_reference(seed=3)
    ref.vae.save_pretrained(tmp_path / "vae-folder")
    folder = write_diffusers_folder(tmp_path / "model", tiny_reference())
    convert(folder, tmp_path / "out2", vae=tmp_path / "vae-folder", dtype="float32")
    errors = check_diffusers_outputs(ref, tmp_path / "out2", components=("vae",))
    assert errors["unet"] > 0.1  # the UNet is the model's (seed 0), not seed 3's


def test_file_without_vae_needs_one(tmp_path):
    orig = original("sd1")
    state = {k: v for k, v in orig.state.items() if not k.startswith("first_stage_model.")}
    src = save_single_file(tmp_path / "no-vae.safetensors", state)
    with pytest.raises(ConversionError, match=r"no VAE .*--vae"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    vae = {k[len("first_stage_model.") :]: v for k, v in orig.state.items() if k.startswith("first_stage_model.")}
    convert(src, tmp_path / "out", vae=save_single_file(tmp_path / "vae.safetensors", vae), dtype="float32")
    check_vae_model(orig, load_component(tmp_path / "out" / "vae"))


# --- quantization ----------------------------------------------------------------------------------------------


def test_quantized_conversion_rebuilds_on_load_and_its_measured_cost(tmp_path):
    """--quantize 8 / 4: the loader rebuilds the converter's QuantizedLinear layers (strict load); the quality
    cost is measured against the same model converted in float32 (random weights, tiny widths)."""
    import mlx.nn as nn

    from mlx_sd.quantization import KEEP_FLOAT
    from oracles import psnr

    ref = tiny_reference(seed=7, unet=(("block_out_channels", (64, 128)),), text=(("intermediate_size", 256),))
    src = write_diffusers_folder(tmp_path / "src", ref)
    convert(src, tmp_path / "float", dtype="float32")
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 16, 16, 4, generator=g), torch.randn(2, 7, 64, generator=g)
    inputs = (mx.array(x.numpy()), mx.array([999.0, 17.5]), mx.array(context.numpy()))
    ids = mx.array(token_batch(49407))
    float_unet = load_component(tmp_path / "float" / "unet")(*inputs)
    float_text = load_component(tmp_path / "float" / "text_encoder")(ids).last_hidden_state
    # (bits, max relative error bound, PSNR bound in dB); measured: 8-bit 1.4e-2 / 55 dB, 4-bit 0.21 / 31 dB
    for bits, bound, min_psnr in ((8, 3e-2, 45), (4, 0.35, 25)):
        info = convert(src, tmp_path / f"q{bits}", quantize=bits, dtype="float32")
        assert info.quantization == {"bits": bits, "group_size": 64, "mode": "affine"}
        unet = load_component(tmp_path / f"q{bits}" / "unet")
        text = load_component(tmp_path / f"q{bits}" / "text_encoder")
        layers = {p: type(m).__name__ for p, m in unet.named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear)}
        kept = {p for p in layers if any(re.fullmatch(k, p) for k in KEEP_FLOAT["unet"])}
        assert kept and all(layers[p] == "Linear" for p in kept)
        assert all(layers[p] == "QuantizedLinear" for p in set(layers) - kept)
        assert all(type(m) is nn.QuantizedLinear for p, m in text.named_modules() if p.endswith(("q_proj", "fc2")))
        vae_config = json.loads((tmp_path / f"q{bits}" / "vae" / "config.json").read_text())
        assert "quantization" not in vae_config
        got_unet, got_text = unet(*inputs), text(ids).last_hidden_state
        errors = {
            "unet": relative_error(got_unet, float_unet),
            "unet PSNR": psnr(got_unet, float_unet, float(float_unet.max() - float_unet.min())),
            "text": relative_error(got_text, float_text),
            "text PSNR": psnr(got_text, float_text, float(float_text.max() - float_text.min())),
        }
        print(f"{bits}-bit vs float32: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
        assert errors["unet"] < bound and errors["text"] < bound
        assert errors["unet PSNR"] > min_psnr and errors["text PSNR"] > min_psnr
        sizes = [(tmp_path / d / "unet" / "weights.safetensors").stat().st_size for d in ("float", f"q{bits}")]
        assert sizes[1] < sizes[0]
        model = StableDiffusion(tmp_path / f"q{bits}", dtype=mx.float16)  # scales and biases cast, ints kept
        assert model.unet.down_blocks[0].attentions[0].proj_in.scales.dtype == mx.float16


# --- robustness: bad inputs, full disks, interruptions -----------------------------------------------------------


@pytest.fixture
def sd1_file(tmp_path):
    return save_single_file(tmp_path / "model.safetensors", original("sd1").state)


@pytest.fixture
def existing(tmp_path, sd1_file):
    """A previous good conversion in OUT, and its contents."""
    convert(sd1_file, tmp_path / "out")
    return tmp_path / "out", folder_digest(tmp_path / "out")


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, existing):
    out, before = existing
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    state = {k: torch.from_numpy(v) for k, v in original("sd1").state.items()}
    torch.save({"state_dict": {**state, "model.diffusion_model.evil": Payload()}}, tmp_path / "trojan.ckpt")
    with pytest.raises(ConversionError, match=r"refused.*`posix\.system`"):
        convert(tmp_path / "trojan.ckpt", out, overwrite=True)
    assert not marker.exists()
    assert folder_digest(out) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("case", ["truncated", "corrupt storage", "html", "wrong family", "missing vae folder"])
def test_broken_sources_give_one_error_and_leave_out_untouched(tmp_path, existing, case):
    out, before = existing
    state = original("sd1").state
    if case == "truncated":
        src = tmp_path / "bad.safetensors"
        src.write_bytes(save_single_file(tmp_path / "t.safetensors", state).read_bytes()[:-1000])
        message = "not a valid safetensors file"
    elif case == "corrupt storage":  # found only when that tensor is read, mid-conversion: CRC-32
        src = save_single_file(tmp_path / "bad.ckpt", state)
        data = bytearray(src.read_bytes())
        data[len(data) // 2] ^= 0xFF
        src.write_bytes(bytes(data))
        message = "CRC-32"
    elif case == "html":
        src = tmp_path / "bad.safetensors"
        src.write_text("<!DOCTYPE html><html>Sign in</html>")
        message = "HTML page"
    elif case == "wrong family":
        src = save_single_file(tmp_path / "sd1.safetensors", state)
        message = "pass the right --family|drop the family override"
    else:
        src = write_diffusers_folder(tmp_path / "folder", tiny_reference())
        shutil.rmtree(src / "vae")
        message = r"vae/config.json is missing"
    with pytest.raises(ConversionError, match=message) as error:
        convert(src, out, overwrite=True, family="sd2" if case == "wrong family" else None)
    assert "\n" not in str(error.value)
    assert folder_digest(out) == before and not leftovers(tmp_path)


def test_full_disk_and_interruption_leave_out_untouched(tmp_path, sd1_file, existing, monkeypatch):
    import errno

    from mlx_sd_convert import output, writer

    out, before = existing
    other = save_single_file(tmp_path / "other.safetensors", original("sd1", seed=9).state)
    written = []

    def full_disk(file, data):
        written.append(len(data))
        if len(written) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        file.write(data)

    with monkeypatch.context() as patch:
        patch.setattr(writer, "_write_bytes", full_disk)
        with pytest.raises(ConversionError, match="not enough disk space.*No space left on device"):
            convert(other, out, overwrite=True)
    assert folder_digest(out) == before and not leftovers(tmp_path)

    with monkeypatch.context() as patch:  # too little free space is refused before anything is written
        patch.setattr(output.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
        with pytest.raises(ConversionError, match="not enough disk space.*GiB are free"):
            convert(other, tmp_path / "new")
    assert not (tmp_path / "new").exists()

    def interrupt(step):
        if step.stage == "write" and step.done > 10**6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(other, out, overwrite=True, progress=interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(other, tmp_path / "fresh", progress=interrupt)
    assert folder_digest(out) == before and not leftovers(tmp_path) and not (tmp_path / "fresh").exists()


def test_converting_again_is_idempotent_and_overwriting_is_explicit(tmp_path, sd1_file, existing):
    out, before = existing
    # the default dtypes: networks in float16, the VAE in float32 as the pipeline runs it
    assert ModelInfo.read(out).dtype == "float16"
    assert load_component(out / "unet").conv_in.weight.dtype == mx.float16
    assert load_component(out / "vae").encoder.conv_in.weight.dtype == mx.float32
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    steps = []
    convert(sd1_file, out, progress=steps.append)
    assert steps[-1].item == "unchanged" and folder_digest(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    convert(sd1_file, tmp_path / "copy")
    assert folder_digest(tmp_path / "copy") == before  # same source, same bytes

    with pytest.raises(ConversionError, match=r"different conversion \(dtype.*--overwrite"):
        convert(sd1_file, out, dtype="float32")
    assert folder_digest(out) == before
    steps = []
    convert(sd1_file, out, dtype="float32", overwrite=True, progress=steps.append)
    assert steps[-1].item == "replaced" and ModelInfo.read(out).dtype == "float32"

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ConversionError, match="not an mlx-sd model folder"):
        convert(sd1_file, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert not leftovers(tmp_path)


# --- the hub -------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_offline_and_unreachable_fail_fast_with_a_clear_message(tmp_path, hub_cache, monkeypatch):
    import socket
    import threading
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ConversionError, match="not .*in the local Hugging Face cache.*HF_HUB_OFFLINE is set"):
        convert("someone/some-model", tmp_path / "out")
    assert time.monotonic() - start < 5

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    start = time.monotonic()
    with pytest.raises(ConversionError, match="cannot be reached"):
        convert("someone/some-model", tmp_path / "out")
    assert time.monotonic() - start < 5

    silent = socket.socket()  # accepts connections and never answers: the case that would hang
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    start = time.monotonic()
    with pytest.raises(ConversionError, match="did not answer within 1 s"):
        convert("someone/some-model/model.safetensors", tmp_path / "out")
    assert time.monotonic() - start < 6
    silent.close()
    assert not (tmp_path / "out").exists()


def test_hub_id_converts_from_the_cache_offline(tmp_path, hub_cache, monkeypatch):
    """A model already in the hub cache converts with HF_HUB_OFFLINE=1 (the cache layout huggingface_hub writes)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--someone--tiny-sd"
    write_diffusers_folder(repo / "snapshots" / commit, tiny_reference())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    info = convert("someone/tiny-sd", tmp_path / "out", dtype="float32")
    assert info.name == "someone/tiny-sd"
    assert info.source["hub"] == {"repo_id": "someone/tiny-sd", "revision": commit}
    check_diffusers_outputs(tiny_reference(), tmp_path / "out")


def test_hub_downloads_only_what_the_conversion_reads():
    """The allow-list for a published repo layout: configs, tokenizer, scheduler, one weights file per converted
    component (safetensors over .bin, the variant when asked), nothing else (safety checker, root checkpoints)."""
    from mlx_sd_convert.hub import needed_files, parse_hub_id

    listing = ["model_index.json", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt", "README.md"]
    for folder, stem in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("safety_checker", "model"),
    ]:
        listing += [f"{folder}/config.json", f"{folder}/{stem}.safetensors", f"{folder}/{stem}.fp16.safetensors"]
        listing += [f"{folder}/{'pytorch_model' if stem == 'model' else stem}.bin"]
    listing += ["tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json"]
    listing += ["scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json"]
    plain = needed_files(listing, None)
    assert sorted(plain) == sorted(
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
        ]
    )
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in needed_files(listing, "fp16")
    assert needed_files(["config.json", "diffusion_pytorch_model.safetensors"], None) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]  # a VAE repo, for --vae
    assert parse_hub_id("owner/name") == ("owner/name", None)
    assert parse_hub_id("owner/name/sub/model.ckpt") == ("owner/name", "sub/model.ckpt")
    assert parse_hub_id("models/sd15.safetensors") is None  # a missing local file, not a repo
    assert parse_hub_id("/abs/path") is None and parse_hub_id("a/b/c.txt") is None


def test_model_cache_converts_once(tmp_path, sd1_file, monkeypatch):
    """What `mlx-sd generate --model FILE` uses: one conversion per source, reused after."""
    from mlx_sd_convert.cache import CACHE_ENV, converted

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = converted(str(sd1_file))
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("model-")
    mtime = (folder / "mlx_sd.json").stat().st_mtime_ns
    assert converted(str(sd1_file)) == folder and (folder / "mlx_sd.json").stat().st_mtime_ns == mtime
    save_single_file(sd1_file, original("sd1", seed=4).state)  # changed in place: a new conversion
    assert converted(str(sd1_file)) != folder


# --- the command line -----------------------------------------------------------------------------------------


def test_cli_convert(tmp_path, sd1_file):
    import subprocess
    import sys

    cli = Path(sys.executable).parent / "mlx-sd"
    html = tmp_path / "download.safetensors"
    html.write_text("<!DOCTYPE html><html>Sign in</html>")
    run = lambda *args: subprocess.run([str(cli), "convert", *map(str, args)], capture_output=True, text=True)  # noqa: E731
    done = run(sd1_file, tmp_path / "out", "--quantize", "8", "--prediction-type", "eps")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"converted: {tmp_path / 'out'} (sd1, float16, 8-bit quantized)")
    assert "prediction_type: epsilon (override" in done.stdout
    again = run(sd1_file, tmp_path / "out", "--quantize", "8", "--prediction-type", "eps")
    assert again.returncode == 0 and again.stdout.startswith("already converted, unchanged")
    for args, message in [
        ((tmp_path / "missing.ckpt", tmp_path / "x"), "missing.ckpt: no such file or folder"),
        ((sd1_file, tmp_path / "out"), "already holds a different conversion"),
        ((sd1_file, tmp_path / "y", "--family", "sd2"), "drop the family override"),
        ((html, tmp_path / "z"), "an HTML page, not weights"),
    ]:
        failed = run(*args)
        lines = [line for line in failed.stderr.splitlines() if line.strip() and "%" not in line]
        assert failed.returncode == 2 and len(lines) == 1 and message in lines[0], failed.stderr
        assert lines[0].startswith("mlx-sd convert: ")
