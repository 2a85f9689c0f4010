"""SD3 single files without text encoders (sd3.5_large.safetensors) completed by the towers Stability publishes as
files of their own (text_encoders/clip_l, clip_g, t5xxl_fp16 / t5xxl_fp8_e4m3fn.safetensors), and fp8 weights.

The towers are written as transformers saves them (CLIPTextModelWithProjection / T5EncoderModel state dicts, with
`logit_scale` where CLIP checkpoints carry it); the MMDiT-and-VAE file by tests/test_sd3_convert.py's independent
inverse key map. Whatever way the towers arrive (found beside the file, passed in any order under any name, cut out
of an incl_clips file with their prefix), the model must be byte-identical to the diffusers folder's conversion,
which tests/test_sd3_convert.py proves against the torch modules. fp8: the converted T5 against transformers' T5
holding the same float8-rounded weights.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import safetensors.torch
import torch
from test_sd3_convert import (
    NETWORKS,
    PROMPTS,
    TOL,
    cache_t5_tokenizer,
    check_networks,
    single_file_state,
    tiny_pipeline,
    write_single_file,
)

from mlx_sd.components import load_component
from mlx_sd_convert import ConversionError, convert
from oracles import assert_close

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from t5_fixtures import train_spiece

    tmp = tmp_path_factory.mktemp("sd3-text-files")
    pipe = tiny_pipeline(tmp)
    pipe.save_pretrained(tmp / "folder")
    convert(tmp / "folder", tmp / "from-folder", dtype="float32")
    return {"pipe": pipe, "tmp": tmp, "spiece": train_spiece(tmp / "spiece"), "from_folder": tmp / "from-folder"}


@pytest.fixture
def offline_t5(sources, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_t5_tokenizer(tmp_path / "hub-cache", sources["spiece"])
    return tmp_path / "hub-cache"


def tower_files(pipe, folder: Path, t5: str | None = "t5xxl_fp16.safetensors") -> dict[str, Path]:
    """clip_l / clip_g / t5xxl files as transformers saves the towers (CLIP with its logit_scale, as checkpoints of the
    whole CLIP model carry it)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, module in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        state = {k: v.contiguous() for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        state["logit_scale"] = torch.tensor(4.6052)
        files[name] = folder / f"{name}.safetensors"
        safetensors.torch.save_file(state, files[name])
    if t5:
        files["t5xxl"] = folder / t5
        state = {k: v.clone() for k, v in pipe.text_encoder_3.state_dict().items()}  # tied: one copy each
        safetensors.torch.save_file(state, files["t5xxl"])
    return files


def assert_same_as_folder(sources, out: Path, networks=NETWORKS) -> None:
    for name in networks:
        for file in ("weights.safetensors", "config.json"):
            assert (out / name / file).read_bytes() == (sources["from_folder"] / name / file).read_bytes(), name


def test_towers_beside_the_file_are_found(sources, tmp_path, offline_t5):
    """Stability's repo layout: sd3.5_large.safetensors with text_encoders/ beside it."""
    repo = tmp_path / "stable-diffusion-3.5-large"
    repo.mkdir()
    file = write_single_file(repo / "sd3.5_large.safetensors", single_file_state(sources["pipe"], False, False))
    tower_files(sources["pipe"], repo / "text_encoders")
    info = convert(file, tmp_path / "out", dtype="float32")
    assert_same_as_folder(sources, tmp_path / "out")
    check_networks(sources["pipe"], tmp_path / "out")  # the tokenizers too
    names = ["sd3.5_large.safetensors"] + [f"text_encoders/{n}.safetensors" for n in ("clip_l", "clip_g", "t5xxl_fp16")]
    assert sorted(info.source["files"]) == sorted(names)
    assert info.source["text_encoders"] == {"text_encoder": names[1], "text_encoder_2": names[2],
                                            "text_encoder_3": names[3]}  # fmt: skip
    assert "text_encoders/clip_l.safetensors (a file of its own)" in info.detection["text_encoder"]["evidence"]
    assert info.detection["text_encoder_3"]["value"] is True


def test_ui_model_folders_are_searched(sources, tmp_path):
    """A UI's models/checkpoints/ with models/clip/ beside it; no T5 there: the model is written without it."""
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    file = write_single_file(models / "checkpoints" / "sd3.5_large.safetensors",
                             single_file_state(sources["pipe"], False, False))  # fmt: skip
    tower_files(sources["pipe"], models / "clip", t5=None)
    info = convert(file, tmp_path / "out", dtype="float32")
    assert_same_as_folder(sources, tmp_path / "out", NETWORKS[:4])
    assert not (tmp_path / "out" / "text_encoder_3").exists()
    assert sorted(info.source["files"]) == sorted(
        ["sd3.5_large.safetensors", "../clip/clip_l.safetensors", "../clip/clip_g.safetensors"]
    )


def test_passed_files_in_any_order_and_layout(sources, tmp_path, offline_t5):
    """Told apart by their tensors, not names or order; a tower cut out of an incl_clips file keeps its prefix."""
    pipe = sources["pipe"]
    files = tower_files(pipe, tmp_path / "towers")
    state = single_file_state(pipe, t5=False)
    cut = {k: v for k, v in state.items() if k.startswith("text_encoders.clip_g.")}
    renamed = {"a": files["t5xxl"], "b": write_single_file(tmp_path / "b.safetensors", cut), "c": files["clip_l"]}
    file = write_single_file(tmp_path / "model.safetensors", single_file_state(pipe, False, False))
    info = convert(file, tmp_path / "out", dtype="float32", text_encoders=list(renamed.values()))
    assert_same_as_folder(sources, tmp_path / "out")
    assert info.source["text_encoders"]["text_encoder_2"] == "b.safetensors"


def test_passed_files_complete_and_replace_the_files_towers(sources, tmp_path, offline_t5):
    """sd3_medium_incl_clips.safetensors + t5xxl_fp16.safetensors: T5 added; a passed CLIP-L replaces the file's."""
    pipe = sources["pipe"]
    files = tower_files(pipe, tmp_path / "towers")
    state = single_file_state(pipe, t5=False)
    key = "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"
    state[key] = state[key] + 1  # the file's CLIP-L differs: the passed one must win
    file = write_single_file(tmp_path / "incl_clips.safetensors", state)
    convert(file, tmp_path / "out", dtype="float32", text_encoders=[files["t5xxl"], files["clip_l"]])
    assert_same_as_folder(sources, tmp_path / "out")


def test_fp8_t5_matches_transformers_on_its_weights(sources, tmp_path, offline_t5):
    """t5xxl_fp8_e4m3fn.safetensors (found when no fp16 file is there), an incl_clips file with T5 in fp8
    (sd3_medium_incl_clips_t5xxlfp8) and ComfyUI's t5xxl_fp8_e4m3fn_scaled.safetensors (per-tensor scales):
    transformers' T5 holding the same float8-rounded (and rescaled) weights is the reference."""
    pipe = sources["pipe"]
    plain, scaled = copy.deepcopy(pipe.text_encoder_3), copy.deepcopy(pipe.text_encoder_3)
    fp8, comfy = {}, {"scaled_fp8": torch.empty(0, dtype=FP8)}
    with torch.no_grad():
        for (name, param), other in zip(plain.named_parameters(), scaled.parameters()):
            if name.endswith(".weight") and param.ndim == 2 and name != "shared.weight":
                fp8[name] = param.to(FP8)
                scale = param.abs().max() / 448
                base = name.removesuffix(".weight")
                comfy[name] = (param / scale).to(FP8)
                comfy |= {f"{base}.scale_weight": scale, f"{base}.scale_input": scale.clone()}
                param.copy_(fp8[name].float())
                other.copy_(comfy[name].float() * scale)
    assert fp8 and all(v.float().isfinite().all() for v in fp8.values())  # no weight beyond float8's 448
    t5_state = {k: fp8.get(k, v).clone() for k, v in pipe.text_encoder_3.state_dict().items()}
    repo = tmp_path / "repo"
    (repo / "text_encoders").mkdir(parents=True)
    tower_files(pipe, repo / "text_encoders", t5=None)
    safetensors.torch.save_file(t5_state, repo / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")
    file = write_single_file(repo / "sd3_medium.safetensors", single_file_state(pipe, False, False))
    whole = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in single_file_state(pipe, t5=False).items()}
    whole.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_state.items()})
    safetensors.torch.save_file(whole, tmp_path / "sd3_medium_incl_clips_t5xxlfp8.safetensors")
    comfy |= {k: v.clone() for k, v in pipe.text_encoder_3.state_dict().items() if k not in comfy}
    safetensors.torch.save_file(comfy, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    towers = [repo / "text_encoders" / "clip_l.safetensors", repo / "text_encoders" / "clip_g.safetensors"]

    ids = pipe.tokenizer_3(PROMPTS, padding="max_length", max_length=40, truncation=True).input_ids
    cases = [
        ("separate", file, None, plain),
        ("whole", tmp_path / "sd3_medium_incl_clips_t5xxlfp8.safetensors", None, plain),
        ("scaled", file, [*towers, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"], scaled),
    ]
    for out, source, text_encoders, reference in cases:
        with torch.no_grad():
            expected = reference(torch.tensor(ids)).last_hidden_state
        info = convert(source, tmp_path / out, dtype="float32", text_encoders=text_encoders)
        got = load_component(tmp_path / out / "text_encoder_3")(mx.array(np.array(ids)))
        assert_close(got, expected, TOL, f"fp8 T5 ({out})")
        assert_same_as_folder(sources, tmp_path / out, NETWORKS[:4])
        if out == "whole":
            assert info.source["files"].keys() == {"sd3_medium_incl_clips_t5xxlfp8.safetensors"}
    default = convert(file, tmp_path / "default")  # float16 by default: fp8 values are exact in it
    assert default.dtype == "float16"
    stored = mx.load(str(tmp_path / "default" / "text_encoder_3" / "weights.safetensors"))
    for name, value in fp8.items():
        np.testing.assert_array_equal(np.array(stored[name].astype(mx.float32)), value.float().numpy(), err_msg=name)


def test_hub_file_id_fetches_its_repos_towers(sources, tmp_path, monkeypatch, offline_t5):
    """`stabilityai/stable-diffusion-3.5-large/sd3.5_large.safetensors`: the repo's text_encoders/ files are fetched
    with it (here from an offline hub cache laid out as huggingface_hub writes it); missing, the error names them."""
    from test_sd3_convert import COMMIT

    snapshot = offline_t5 / "models--stabilityai--stable-diffusion-3.5-large" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    write_single_file(snapshot / "sd3.5_large.safetensors", single_file_state(sources["pipe"], False, False))
    hub_id = "stabilityai/stable-diffusion-3.5-large/sd3.5_large.safetensors"
    with pytest.raises(ConversionError, match=r"text_encoders/clip_l\.safetensors is not \(completely\) in the local"):
        convert(hub_id, tmp_path / "out")
    tower_files(sources["pipe"], snapshot / "text_encoders")
    info = convert(hub_id, tmp_path / "out", dtype="float32")
    assert_same_as_folder(sources, tmp_path / "out")
    assert info.source["hub"]["revision"] == COMMIT
    assert info.source["text_encoders"]["text_encoder_3"] == "text_encoders/t5xxl_fp16.safetensors"


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare(sources):
    """An MMDiT-and-VAE file and its towers, in a folder with no text_encoders/."""
    tmp = sources["tmp"] / "bare"
    tmp.mkdir()
    file = write_single_file(tmp / "sd3.5_large.safetensors", single_file_state(sources["pipe"], False, False))
    return file, tower_files(sources["pipe"], sources["tmp"] / "bare-towers")


def test_no_towers_anywhere_is_refused_with_the_fix(bare, tmp_path):
    file, _ = bare
    with pytest.raises(ConversionError, match=r"no CLIP-L and bigG \(CLIP-G\) in the file, nor as clip_l/clip_g"
                       r".*--text-encoder clip_l\.safetensors --text-encoder clip_g\.safetensors.*"
                       r"mlx-sd convert stabilityai/stable-diffusion-3\.5-large OUT"):  # fmt: skip
        convert(file, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"no CLIP-L and bigG \(CLIP-G\) among the text encoder files passed"):
        convert(file, tmp_path / "out", text_encoders=[bare[1]["t5xxl"]])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("twice", r"both hold T5-XXL; pass one file per text encoder"),
        ("alone", r"a CLIP text tower 64 wide, neither CLIP-L \(768\) nor bigG \(1280\)"),
        ("not a tower", r"not a CLIP or T5 text encoder \(no \*encoder\.layers\.0\.self_attn\.q_proj\.weight"),
        ("open_clip", r"an OpenCLIP-layout text tower \(transformer\.resblocks\.\*\)"),
        ("stray", r"1 tensors are not bigG \(CLIP-G\)'s \(first_stage_model\.decoder\.conv_in\.weight\)"),
        ("missing", r"text encoder .*nowhere\.safetensors: no such file"),
    ],
)
def test_bad_tower_files_are_refused(bare, tmp_path, case, message):
    file, towers = bare
    passed = {
        "twice": [towers["t5xxl"], towers["clip_l"], towers["clip_g"], towers["t5xxl"]],
        "alone": [towers["clip_l"]],
        "missing": [tmp_path / "nowhere.safetensors"],
    }.get(case)
    if case == "not a tower":
        passed = [file, towers["clip_g"]]
    if case == "open_clip":
        other = tmp_path / "open_clip.safetensors"
        safetensors.torch.save_file({"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2)}, other)
        passed = [towers["clip_l"], other]
    if case == "stray":
        state = {
            f"text_encoders.clip_g.transformer.{k}": v for k, v in safetensors.torch.load_file(towers["clip_g"]).items()
        }
        state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2)  # outside the tower's prefix
        safetensors.torch.save_file(state, tmp_path / "clip_g.safetensors")
        passed = [towers["clip_l"], tmp_path / "clip_g.safetensors"]
    with pytest.raises(ConversionError, match=message):
        convert(file, tmp_path / "out", text_encoders=passed)
    assert not (tmp_path / "out").exists()


def test_text_encoders_of_another_model_are_refused(bare, tmp_path):
    """A bigG of another width than this MMDiT's: the pooled widths do not add up to what it takes."""
    from test_sd3_convert import CLIP_G
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    wide = dict(CLIP_G, hidden_size=192, num_attention_heads=3, projection_dim=192)
    tower = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **wide))
    state = {k: v.contiguous() for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    safetensors.torch.save_file(state, tmp_path / "clip_g.safetensors")
    with pytest.raises(ConversionError, match=r"pool 64 \+ 192 = 256 values, but this MMDiT takes 192: they are not"):
        convert(bare[0], tmp_path / "out", text_encoders=[bare[1]["clip_l"], tmp_path / "clip_g.safetensors"])


def test_text_encoders_are_for_sd3_single_files(sources, bare, tmp_path):
    with pytest.raises(ConversionError, match=r"is a folder; text encoder files \(--text-encoder\) complete SD3"):
        convert(sources["tmp"] / "folder", tmp_path / "out", text_encoders=[bare[1]["clip_l"]])
    from convert_fixtures import save_single_file
    from ldm_fixtures import original

    sd1 = save_single_file(tmp_path / "sd1.safetensors", original("sd1").state)
    with pytest.raises(ConversionError, match=r"complete SD3 single files; this is no SD3 file"):
        convert(sd1, tmp_path / "out", text_encoders=[bare[1]["clip_l"]])


def test_cli_passes_text_encoders(sources, bare, tmp_path):
    file, towers = bare
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "mlx_sd_apps.cli", "convert", str(file), str(tmp_path / "out"), "--dtype", "float32"]
    done = subprocess.run([*cli, "--text-encoder", str(towers["clip_g"]), "--text-encoder", str(towers["clip_l"])],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "bigG (CLIP-G): ../bare-towers/clip_g.safetensors (a file of its own)" in done.stdout
    assert_same_as_folder(sources, tmp_path / "out", NETWORKS[:4])
    manifest = json.loads((tmp_path / "out" / "mlx_sd.json").read_text())
    assert set(manifest["source"]["files"]) == {"sd3.5_large.safetensors", "../bare-towers/clip_l.safetensors",
                                                "../bare-towers/clip_g.safetensors"}  # fmt: skip
    refused = subprocess.run(cli[:-2], capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode != 0 and "--text-encoder clip_l.safetensors" in refused.stderr
    assert "Traceback" not in refused.stderr
