"""SD3 / SD3.5 conversion: diffusers folders and Stability's single files, against the references.

The model is a tiny random-weight StableDiffusion3Pipeline whose heads are 64 channels wide everywhere (as the real
models': single files cannot show head counts). It is written as a diffusers folder (save_pretrained; also without
T5, and as fp16-variant shards) and as a single file in Stability's layout by an inverse key map kept here, which
diffusers' own `from_single_file` reads back into the same weights. Each conversion is loaded as the pipeline loads
it and compared with the torch modules at float32; the folder and the single file must convert to byte-identical
components.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from sgm_fixtures import _vae_key
from t5_fixtures import train_spiece
from test_mmdit import to_single_file
from tiny_sd3 import tiny_sd3

from mlx_sd.components import load_component
from mlx_sd.model import ModelInfo
from mlx_sd.t5_tokenizer import T5Tokenizer
from mlx_sd.tokenizer import CLIPTokenizer
from mlx_sd_convert import ConversionError, convert
from oracles import assert_close, nchw_to_nhwc, state_dict_numpy

TOL = 1e-4
NETWORKS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
CLIP_L = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
              hidden_act="quick_gelu", projection_dim=64)  # fmt: skip
CLIP_G = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu",
              projection_dim=128)  # fmt: skip
T5 = dict(vocab_size=300, d_model=256, d_kv=16, d_ff=96, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
    joint_attention_dim=T5["d_model"], caption_projection_dim=128,
    pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"], out_channels=16, pos_embed_max_size=32,
)  # fmt: skip
# No "!": transformers matches tokenizer_2's pad token "!" as a special token inside prompts (mlx_sd/tokenizer.py).
PROMPTS = ["a photo of an astronaut riding a horse on mars", "A red lighthouse, café?", ""]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_pipeline(tmp: Path, seed: int = 0):
    """Wider than tests/tiny_sd3.py's: Stability's single files imply heads of 64 channels."""
    return tiny_sd3(tmp, seed, transformer=TRANSFORMER, clip_l=CLIP_L, clip_g=CLIP_G, t5_config=T5)


# --- Stability's single-file layout (the inverse of the converter's maps, written independently) --------------


def single_file_state(pipe, t5: bool = True, clips: bool = True) -> dict[str, np.ndarray]:
    """sd3_medium_incl_clips_t5xxlfp16.safetensors' layout: MMDiT, autoencoder, CLIP-L, bigG and T5."""
    state = to_single_file(state_dict_numpy(pipe.transformer), TRANSFORMER["num_layers"])
    n = len(pipe.vae.config.block_out_channels)
    for key, value in state_dict_numpy(pipe.vae).items():
        target = _vae_key(key, n)
        if ".mid.attn_1." in target and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        state[f"first_stage_model.{target}"] = value
    if clips:
        for name, module in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
            tower = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                     for k, v in state_dict_numpy(module).items()}  # fmt: skip
            state.update({f"text_encoders.{name}.transformer.{k}": v for k, v in tower.items()})
    if t5:
        state.update(
            {f"text_encoders.t5xxl.transformer.{k}": v for k, v in state_dict_numpy(pipe.text_encoder_3).items()}
        )
    return state


def write_single_file(path: Path, state: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path


def cache_t5_tokenizer(cache: Path, spiece: Path) -> None:
    """google/t5-v1_1-xxl's spiece.model in a hub cache, laid out as huggingface_hub writes it."""
    repo = cache / "models--google--t5-v1_1-xxl"
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    shutil.copy(spiece / "spiece.model", repo / "snapshots" / COMMIT / "spiece.model")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3-sources")
    pipe = tiny_pipeline(tmp)
    pipe.save_pretrained(tmp / "folder")
    state = single_file_state(pipe)
    return {
        "pipe": pipe,
        "folder": tmp / "folder",
        "file": write_single_file(tmp / "sd3_tiny_incl_clips_t5xxlfp16.safetensors", state),
        "spiece": train_spiece(tmp / "spiece"),
        "tmp": tmp,
    }


@pytest.fixture
def t5_in_hub_cache(sources, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_t5_tokenizer(tmp_path / "hub-cache", sources["spiece"])


@pytest.fixture(scope="module")
def from_folder(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3-converted") / "from-folder"
    return convert(sources["folder"], out, dtype="float32"), out


def test_fixture_writer_is_read_back_identically_by_diffusers(sources):
    """diffusers' from_single_file (offline, configs from the folder) reads the written file into the same weights."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_single_file(
        str(sources["file"]), config=str(sources["folder"]), local_files_only=True
    )
    for name in NETWORKS:
        expected, got = getattr(sources["pipe"], name).state_dict(), getattr(pipe, name).state_dict()
        expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
        got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
        assert expected.keys() == got.keys(), name
        different = [k for k in expected if not torch.equal(expected[k], got[k].to(expected[k].dtype))]
        assert not different, f"{name}: {different[:5]}"


# --- the diffusers folder against the references ----------------------------------------------------------------


def check_networks(pipe, out: Path, t5: bool = True) -> dict[str, float]:
    """Every converted network, loaded as the pipeline loads it, against the torch module at float32."""
    errors = {}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, 8, generator=g)
    t = torch.tensor([999.0, 17.5])
    context = torch.randn(2, 7, TRANSFORMER["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, TRANSFORMER["pooled_projection_dim"], generator=g)
    with torch.no_grad():
        expected = pipe.transformer(x, context, pooled, t).sample
    got = load_component(out / "transformer")(nchw_to_nhwc(x), mx.array(t.numpy()), mx.array(context.numpy()),
                                              mx.array(pooled.numpy()))  # fmt: skip
    errors["transformer"] = assert_close(got, nchw_to_nhwc(expected), TOL, "transformer")

    vae = load_component(out / "vae")
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)
    assert not (vae.config.use_quant_conv or vae.config.use_post_quant_conv)
    z = torch.randn(1, 16, 4, 6, generator=g)
    with torch.no_grad():
        decoded = pipe.vae.decode(z).sample
    errors["vae"] = assert_close(vae.decode(nchw_to_nhwc(z)), nchw_to_nhwc(decoded), TOL, "vae decode")

    for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        ids = getattr(pipe, tokenizer)(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        with torch.no_grad():
            ref = getattr(pipe, name)(torch.tensor(ids), output_hidden_states=True)
        ours = load_component(out / name)(mx.array(np.array(ids)))
        errors[name] = assert_close(ours.hidden_states[-2], ref.hidden_states[-2], TOL, f"{name} penultimate")
        assert_close(ours.text_embeds, ref.text_embeds, TOL, f"{name} pooled")
        assert CLIPTokenizer.from_folder(out / tokenizer)(PROMPTS).ids.tolist() == ids, tokenizer
    if t5:
        ids = pipe.tokenizer_3(PROMPTS, padding="max_length", max_length=40, truncation=True).input_ids
        with torch.no_grad():
            ref = pipe.text_encoder_3(torch.tensor(ids)).last_hidden_state
        ours = load_component(out / "text_encoder_3")(mx.array(np.array(ids)))
        errors["text_encoder_3"] = assert_close(ours, ref, TOL, "text_encoder_3")
        assert T5Tokenizer.from_folder(out / "tokenizer_3").encode(PROMPTS, 40).tolist() == ids
    else:
        assert not (out / "text_encoder_3").exists() and not (out / "tokenizer_3").exists()
    return errors


def test_diffusers_folder_matches_the_references(sources, from_folder):
    info, out = from_folder
    errors = check_networks(sources["pipe"], out)
    print("sd3 folder, fp32 relative errors:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert ModelInfo.read(out) == info
    assert (info.family, info.prediction_type, info.kind, info.dtype) == ("sd3", "flow", "", "float32")
    assert info.detection["text_encoder_3"]["value"] is True
    assert info.detection["prediction_type"]["confidence"] == "certain"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    published = json.loads((sources["folder"] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == published and scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert scheduler["shift"] == 3.0
    kinds = {name: json.loads((out / name / "config.json").read_text())["kind"] for name in NETWORKS}
    assert kinds == {"transformer": "mmdit", "vae": "vae", "text_encoder": "clip_text", "text_encoder_2": "clip_text",
                     "text_encoder_3": "t5_text"}  # fmt: skip
    assert not (out / "unet").exists()


def test_default_dtypes_and_variant_shards(sources, from_folder, tmp_path):
    """fp16-variant, sharded weights (as the hub's text_encoder_3) convert to the same model; by default the networks
    are stored in float16 and the VAE in float32."""
    variant = tmp_path / "variant"
    sources["pipe"].save_pretrained(variant, variant="fp16", max_shard_size="200KB")
    assert list((variant / "text_encoder_3").glob("*.index.fp16.json")) or list(
        (variant / "text_encoder_3").glob("*.fp16.safetensors.index.json")
    )
    info = convert(variant, tmp_path / "out", dtype="float32", variant="fp16")
    assert info.source["variant"] == "fp16"
    for name in NETWORKS:
        assert (tmp_path / "out" / name / "weights.safetensors").read_bytes() == (
            from_folder[1] / name / "weights.safetensors"
        ).read_bytes(), name
    info = convert(sources["folder"], tmp_path / "default")
    assert info.dtype == "float16"
    for name in NETWORKS:
        stored = mx.load(str(tmp_path / "default" / name / "weights.safetensors"))
        assert {v.dtype for v in stored.values()} == {mx.float32 if name == "vae" else mx.float16}, name


def test_folder_without_t5(sources, tmp_path):
    """model_index.json lists text_encoder_3 and tokenizer_3 as null: the model is written without them."""
    pipe = sources["pipe"]
    parts = {k: v for k, v in pipe.components.items() if k not in ("text_encoder_3", "tokenizer_3")}
    type(pipe)(**parts, text_encoder_3=None, tokenizer_3=None).save_pretrained(tmp_path / "folder")
    assert json.loads((tmp_path / "folder" / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    info = convert(tmp_path / "folder", tmp_path / "out", dtype="float32")
    check_networks(pipe, tmp_path / "out", t5=False)
    assert info.detection["text_encoder_3"]["value"] is False
    assert "zeros" in info.detection["text_encoder_3"]["evidence"]


# --- single files -------------------------------------------------------------------------------------------


def test_single_file_converts_to_the_folders_model(sources, from_folder, tmp_path, t5_in_hub_cache):
    info = convert(sources["file"], tmp_path / "out", dtype="float32")
    folder = from_folder[1]
    for name in NETWORKS:
        for file in ("weights.safetensors", "config.json"):
            assert (tmp_path / "out" / name / file).read_bytes() == (folder / name / file).read_bytes(), name
    check_networks(sources["pipe"], tmp_path / "out")  # the tokenizers too (bundled CLIP, T5 from the hub cache)
    assert (info.family, info.prediction_type) == ("sd3", "flow")
    assert info.detection["text_encoder_3"]["value"] is True
    assert info.detection["family"]["confidence"] == "certain"
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def test_single_file_and_folder_quantize_alike(sources, tmp_path, t5_in_hub_cache):
    """--quantize 8 (tests/test_sd3_quantization.py: the selection and its cost): both layouts give the same bytes."""
    for src, out in ((sources["folder"], "folder"), (sources["file"], "file")):
        info = convert(src, tmp_path / out, quantize=8)
        assert info.quantization == {"bits": 8, "group_size": 64, "mode": "affine"}
    for name in NETWORKS:
        for file in ("weights.safetensors", "config.json"):
            assert (tmp_path / "file" / name / file).read_bytes() == (tmp_path / "folder" / name / file).read_bytes()


def test_single_file_clip_l_projection_is_the_identity(sources, tmp_path):
    """A CLIP-L projection stored in the file is not what SD3 uses (it pools CLIP-L unprojected): dropped, and the
    identity written, also when the file has none; no T5: written without text_encoder_3 (no hub needed)."""
    state = single_file_state(sources["pipe"], t5=False)
    key = "text_encoders.clip_l.transformer.text_projection.weight"
    state[key] = np.random.default_rng(0).standard_normal(state[key].shape).astype(np.float32)
    without = {k: v for k, v in state.items() if k != key}
    for name, variant in (("with", state), ("without", without)):
        out = tmp_path / name
        info = convert(write_single_file(tmp_path / f"{name}.safetensors", variant), out, dtype="float32")
        projection = mx.load(str(out / "text_encoder" / "weights.safetensors"))["text_projection.weight"]
        np.testing.assert_array_equal(np.array(projection), np.eye(CLIP_L["hidden_size"]))
        assert info.detection["text_encoder_3"]["value"] is False
        assert not (out / "text_encoder_3").exists() and not (out / "tokenizer_3").exists()
    check_networks(sources["pipe"], tmp_path / "with", t5=False)


def test_single_file_t5_tokenizer_offline_fails_fast(sources, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match=r"T5 tokenizer .*google/t5-v1_1-xxl/spiece\.model.* not in the local "
                       r"Hugging Face cache .*HF_HUB_OFFLINE is set"):  # fmt: skip
        convert(sources["file"], tmp_path / "out")


def test_stray_tensors_are_named(sources, tmp_path):
    state = single_file_state(sources["pipe"], t5=False)
    state["text_encoders.clip_l.logit_scale"] = np.ones((), np.float32)
    with pytest.raises(ConversionError, match=r"1 tensors belong to no SD3 component \(text_encoders\.clip_l\.logit"):
        convert(write_single_file(tmp_path / "stray.safetensors", state), tmp_path / "out")


# --- overrides, options and detection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(family="sdxl"), "is an SD3 / SD3.5 model, not sdxl: drop the family override"),
        (dict(prediction_type="epsilon"), "rectified-flow models .*not epsilon"),
        (dict(kind="lcm"), "no LCM-distilled SD3 models"),
    ],
)
def test_nonsense_overrides_are_refused(sources, tmp_path, t5_in_hub_cache, options, message):
    for src in (sources["folder"], sources["file"]):
        with pytest.raises(ConversionError, match=message):
            convert(src, tmp_path / "out", **options)


def test_sd3_overrides_on_other_families_are_refused(tmp_path):
    from convert_fixtures import tiny_reference, write_diffusers_folder

    folder = write_diffusers_folder(tmp_path / "sd1", tiny_reference())
    with pytest.raises(ConversionError, match="family sd3 needs an SD3 folder"):
        convert(folder, tmp_path / "out", family="sd3")
    with pytest.raises(ConversionError, match="prediction type flow .* is SD3's; this is an sd1 model"):
        convert(folder, tmp_path / "out", prediction_type="flow")


def test_ldm_detection_recognises_sd3_files(sources):
    """The SD 1.x/2.x/XL detection never takes an MMDiT for a UNet."""
    from mlx_sd_convert.ldm import plan_single_file
    from mlx_sd_convert.ldm_detect import detect
    from mlx_sd_convert.readers import open_checkpoint

    checkpoint = open_checkpoint(sources["file"])
    shapes = {k: checkpoint.info(k).shape for k in checkpoint}
    dtypes = {k: checkpoint.info(k).dtype for k in checkpoint}
    assert detect(checkpoint, shapes, dtypes).family.value == "sd3"
    with pytest.raises(ConversionError, match="an SD3 / SD3.5 file"):
        plan_single_file(checkpoint, shapes=shapes, dtypes=dtypes)


def test_hub_downloads_what_an_sd3_conversion_reads():
    """stabilityai/stable-diffusion-3-medium-diffusers' layout: the transformer and all three text encoders (T5 as
    fp16 shards with the variant), tokenizer_3's files, nothing else."""
    from mlx_sd_convert.hub import needed_files

    listing = ["model_index.json", "sd3_medium.safetensors", "README.md", "scheduler/scheduler_config.json"]
    listing += [f"{f}/config.json" for f in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")]
    listing += ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    listing += ["text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"]
    listing += ["text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors"]
    shards = [f"text_encoder_3/model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]
    listing += ["text_encoder_3/model.safetensors.index.fp16.json", *shards]
    for tok in ("tokenizer", "tokenizer_2"):
        listing += [f"{tok}/vocab.json", f"{tok}/merges.txt", f"{tok}/special_tokens_map.json"]
    tokenizer_3 = ["tokenizer_3/spiece.model", "tokenizer_3/tokenizer.json", "tokenizer_3/tokenizer_config.json"]
    listing += tokenizer_3
    wanted = set(needed_files(listing, "fp16"))
    assert set(tokenizer_3) <= wanted and set(shards) <= wanted
    assert "transformer/diffusion_pytorch_model.safetensors" in wanted  # no fp16 file: the plain one
    assert "text_encoder_3/model.safetensors.index.fp16.json" in wanted
    assert not {"sd3_medium.safetensors", "README.md", "text_encoder/model.safetensors"} & wanted


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-large", "sd3.5-medium"])
def test_published_configs_translate_and_single_files_name_their_release(name):
    """convert/families.py's SD3 data: each transformer translates, and a full-size single file of it (shapes only,
    built on the meta device) is recognised as that release; the VAE and T5 configs are the ones mlx-sd implements."""
    from diffusers import SD3Transformer2DModel

    from mlx_sd.models import T5Config
    from mlx_sd_convert.diffusers import mmdit_config, t5_config, vae_config
    from mlx_sd_convert.families import SD3_TRANSFORMERS, family_config
    from mlx_sd_convert.sd3 import mmdit_config_from_checkpoint, release

    published = SD3_TRANSFORMERS[name]
    with torch.device("meta"):
        module = SD3Transformer2DModel(**published)
    stand_ins = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in module.state_dict().items()}
    shapes = {
        k.removeprefix("model.diffusion_model."): v.shape
        for k, v in to_single_file(stand_ins, module.config.num_layers).items()
    }
    assert mmdit_config_from_checkpoint(shapes) == mmdit_config(published)
    assert release(mmdit_config(published)) == name
    vae = vae_config(family_config("sd3", "vae"))
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor, vae.use_quant_conv) == (
        16,
        1.5305,
        0.0609,
        False,
    )
    assert t5_config(family_config("sd3", "text_encoder_3")) == T5Config()
