"""Textual inversion parity with diffusers' `load_textual_inversion` on tiny SD1 and SDXL models.

Embeddings are written in the formats people download (A1111 `.pt` with string_to_param, diffusers
`learned_embeds.bin`, one-tensor `.safetensors`, SDXL `clip_l`/`clip_g`), loaded by diffusers and by us; the text
conditioning for prompts using them must agree within 1e-4 (pooled SDXL embedding included: both pool at
argmax(ids), the embedding's id), and an image within 40 dB.
"""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from test_pipeline import check, diffusers_pipe, generators
from test_sdxl_pipeline import xl_pipe
from tiny_pipelines import mlx_folder, tiny_components

from mlx_sd.pipeline import Pipeline
from mlx_sd_convert import ConversionError
from mlx_sd_convert.embeddings import file_sha256, read_embedding
from mlx_sd_convert.library import EmbeddingLibrary, embeddings_api
from mlx_sd_convert.readers import UnsafeCheckpointError
from oracles import assert_close, to_numpy

TOL = 1e-4
WIDTH = 32  # the tiny text towers' width


def vectors(n, seed, width=WIDTH):
    return (np.random.default_rng(seed).normal(0, 0.5, (n, width))).astype(np.float32)


def write_embeddings(folder, sdxl=False):
    """Files in each format; returns {name: path} in loading order."""
    folder.mkdir(exist_ok=True)
    files = {}
    if sdxl:
        files["xlemb"] = folder / "xlemb.safetensors"
        save_file({"clip_l": vectors(2, 1), "clip_g": vectors(2, 2)}, str(files["xlemb"]))
        return files
    files["mystyle"] = folder / "mystyle.pt"  # A1111's training output
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors(2, 3))},
                "name": "mystyle", "step": 500, "sd_checkpoint": "abcdef", "sd_checkpoint_name": "tiny"},
               files["mystyle"])  # fmt: skip
    files["cattoy"] = folder / "cattoy.bin"  # diffusers' learned_embeds.bin: {token: (D,)}
    torch.save({"<cat-toy>": torch.from_numpy(vectors(1, 4)[0])}, files["cattoy"])
    files["emb3"] = folder / "emb3.safetensors"
    save_file({"emb_params": vectors(3, 5)}, str(files["emb3"]))
    return files


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ti-sd1")
    parts = tiny_components(tmp, "sd1", seed=3)
    ours = Pipeline(mlx_folder(parts, tmp / "mlx", "sd1"))
    pipe = diffusers_pipe("StableDiffusionPipeline", parts, "EulerDiscreteScheduler")
    files = write_embeddings(tmp / "embeddings")
    for name, path in files.items():
        pipe.load_textual_inversion(str(path), token=name)
    ours.load_embeddings([read_embedding(path) for path in files.values()])
    return pipe, ours, files


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ti-sdxl")
    parts = tiny_components(tmp, "sdxl", seed=4)
    ours = Pipeline(mlx_folder(parts, tmp / "mlx", "sdxl"))
    pipe = xl_pipe("StableDiffusionXLPipeline", parts, "EulerDiscreteScheduler")
    files = write_embeddings(tmp / "embeddings", sdxl=True)
    state = read_embedding(files["xlemb"]).vectors
    for key, suffix in (("clip_l", ""), ("clip_g", "_2")):
        pipe.load_textual_inversion(torch.from_numpy(np.array(state[key])), token="xlemb",
                                    text_encoder=getattr(pipe, f"text_encoder{suffix}"),
                                    tokenizer=getattr(pipe, f"tokenizer{suffix}"))  # fmt: skip
    ours.load_embeddings([read_embedding(files["xlemb"])])
    return pipe, ours, files


# Names match case-insensitively. (A multi-vector name in other case, "MyStyle", differs: diffusers rewrites the
# prompt text with a case-sensitive str.replace and so gives it one vector; we and A1111 give it all of them.)
PROMPTS = ["a photo of mystyle on a beach", "cattoy and emb3, oil painting", "mystyle cattoy emb3 CatToy", "a cat"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sd1_embeddings_match_diffusers(sd1, prompt):
    pipe, ours, _ = sd1
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    cond, _ = ours.model.text.encode([prompt])
    error = assert_close(np.array(cond.context), to_numpy(expected), TOL, f"SD1 {prompt!r}")
    print(f"SD1 embeddings {prompt!r}: {error:.1e}")


def test_sdxl_dual_embedding_matches_diffusers_pooled_included(sdxl):
    pipe, ours, _ = sdxl
    prompt = "a portrait in xlemb style"
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    cond, _ = ours.model.text.encode([prompt])
    errors = [assert_close(np.array(cond.context), to_numpy(embeds), TOL, "SDXL context"),
              assert_close(np.array(cond.pooled), to_numpy(pooled), TOL, "SDXL pooled")]  # fmt: skip
    print(f"SDXL clip_l/clip_g embedding: context {errors[0]:.1e}, pooled {errors[1]:.1e}")
    tokens = ours.model.text.towers[1].tokenizer.encode(prompt)
    assert tokens[-3:-1] == [49408, 49409]  # "xlemb" -> its two vectors' ids


def test_image_with_embedding_matches_diffusers_and_records_ti_hashes(sd1):
    pipe, ours, files = sd1
    prompt, negative = "a boat in mystyle", "emb3"
    expected = pipe(prompt, negative_prompt=negative, width=64, height=64, num_inference_steps=3, guidance_scale=5.0,
                    generator=generators(8, 1), output_type="np").images  # fmt: skip
    kwargs = dict(prompt=prompt, negative_prompt=negative, width=64, height=64, steps=3, guidance=5.0,
                  sampler="EulerDiscreteScheduler", seed=8)  # fmt: skip
    result = ours.generate(**kwargs)
    check(result, expected, "SD1 image with embeddings")
    hashes = f"mystyle: {file_sha256(files['mystyle'])[:12]}, emb3: {file_sha256(files['emb3'])[:12]}"
    assert f'TI hashes: "{hashes}"' in result.infotexts[0]
    # Low-memory mode frees the text encoders; reloaded ones get the embeddings again.
    low = ours.generate(low_memory=True, **kwargs)
    again = ours.generate(**kwargs)
    assert np.array_equal(np.asarray(low.images[0]), np.asarray(result.images[0]))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_listing_and_skipped_embeddings(sd1, tmp_path):
    _, ours, files = sd1
    folder = tmp_path / "emb"
    write_embeddings(folder)
    write_embeddings(folder / "xl", sdxl=True)
    loaded, skipped = EmbeddingLibrary(folder).for_model(ours.model)
    assert [e.name for e in loaded] == ["cattoy", "emb3", "mystyle"] and list(skipped) == ["xlemb"]
    api = embeddings_api(loaded, skipped)
    assert api["loaded"]["mystyle"] == {"step": 500, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                        "shape": WIDTH, "vectors": 2}  # fmt: skip
    assert api["skipped"]["xlemb"]["vectors"] == 2
    with pytest.raises(ValueError, match="names repeated or already loaded"):
        ours.load_embeddings([read_embedding(files["cattoy"])])
    with pytest.raises(ValueError, match="needs a single tensor"):
        ours.load_embeddings([read_embedding(folder / "xl" / "xlemb.safetensors")])


def test_bad_embedding_files_are_refused(sd1, tmp_path):
    _, ours, _ = sd1
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH)}, "name": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_embedding(tmp_path / "evil.pt")
    assert not marker.exists()
    save_file({"a": vectors(1, 0), "b": vectors(1, 1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConversionError, match="not a textual-inversion embedding"):
        read_embedding(tmp_path / "two.safetensors")
    save_file({"emb_params": vectors(2, 0, width=48)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="takes width 32"):
        ours.load_embeddings([read_embedding(tmp_path / "wide.safetensors")])
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ConversionError, match="empty"):
        read_embedding(tmp_path / "empty.pt")
