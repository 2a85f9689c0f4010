"""Published-format model folders and files written at test time from random-weight reference models.

- `tiny_reference()`: a tiny SD1-layout diffusers UNet, AutoencoderKL and transformers CLIPTextModel, every
  parameter randomised.
- `write_diffusers_folder()`: those modules as diffusers publishes them: safetensors, or `.bin` pickles (the text
  encoder as transformers 4.x wrote it: `text_model.` prefix and the position_ids buffer), fp16 `variant` files,
  sharded weights; plus a transformers tokenizer folder, the scheduler config and model_index.json.
- `diffusers_folder_from_single_file()`: an original-layout single file turned into a diffusers folder by
  diffusers' own single-file loaders, so the same weights exist in both layouts.
- `save_single_file()`: an original-layout state dict as `.safetensors`, or `.ckpt` written by torch.save
  (optionally nested under "state_dict" with a global_step, as Lightning saves it).
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlx_sd.tokenizer import CLIPTokenizer
from mlx_sd_convert.families import family_config
from oracles import randomize

TINY_UNET = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=64,
    norm_num_groups=32,
)
TINY_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
)
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_act="quick_gelu",
    vocab_size=49408,
    max_position_embeddings=77,
    eos_token_id=2,  # the legacy value the SD1.5 folder carries
)


@dataclass
class Reference:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text: torch.nn.Module


@functools.cache
def tiny_reference(seed: int = 0, unet: tuple = (), text: tuple = ()) -> Reference:
    """Tiny random diffusers/transformers modules; `unet`/`text` override config entries (as item tuples)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return Reference(
        unet=randomize(UNet2DConditionModel(**{**TINY_UNET, **dict(unet)}), seed),
        vae=randomize(AutoencoderKL(**TINY_VAE), seed + 1),
        text=randomize(CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, **dict(text)})), seed + 2),
    )


@functools.cache
def _tokenizer_folder(pad_token: str) -> Path:
    """A transformers CLIPTokenizer folder made from the CLIP vocabulary (as diffusers folders carry it)."""
    import atexit
    import tempfile

    from transformers import CLIPTokenizer as HFTokenizer

    root = Path(tempfile.mkdtemp(prefix="mlx-sd-tokenizer-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # cached for the session, removed at its end
    CLIPTokenizer.bundled().save(root / "vocab")
    (root / "vocab" / "config.json").unlink()  # leave vocab.json + merges.txt, as transformers reads them
    tokenizer = HFTokenizer.from_pretrained(root / "vocab", pad_token=pad_token, model_max_length=77)
    tokenizer.save_pretrained(root / "tokenizer")
    return root / "tokenizer"


def _text_model_prefixed(state: dict) -> dict:
    """transformers 4.x's CLIPTextModel keys: `text_model.` prefix and the int64 position_ids buffer."""
    out = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    out["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def write_diffusers_folder(
    root: Path,
    ref: Reference,
    *,
    safe: bool = True,
    variant: str | None = None,
    half: bool = False,
    max_shard_size: str | None = None,
    family: str = "sd1",
    scheduler: dict | None = None,
) -> Path:
    """Write `ref` as a diffusers StableDiffusionPipeline folder."""
    root.mkdir(parents=True)
    unet, vae, text = (copy.deepcopy(m).half() if half else m for m in (ref.unet, ref.vae, ref.text))
    shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    unet.save_pretrained(root / "unet", safe_serialization=safe, variant=variant, **shard)
    vae.save_pretrained(root / "vae", safe_serialization=safe, variant=variant)
    if safe:
        text.save_pretrained(root / "text_encoder", variant=variant)
    else:  # transformers 5 writes only safetensors; write the .bin as transformers 4.x did
        text.config.save_pretrained(root / "text_encoder")
        name = "pytorch_model.bin" if variant is None else f"pytorch_model.{variant}.bin"
        torch.save(_text_model_prefixed(text.state_dict()), root / "text_encoder" / name)
    shutil.copytree(_tokenizer_folder("!" if family == "sd2" else "<|endoftext|>"), root / "tokenizer")
    (root / "scheduler").mkdir()
    config = scheduler or family_config(family, "scheduler")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", config["_class_name"]],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def save_single_file(path: Path, state: dict[str, np.ndarray], *, lightning: bool = False, global_step=None) -> Path:
    """An original-layout state dict as .safetensors or (any other suffix) a torch.save pickle."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        top = {"state_dict": tensors, "global_step": global_step, "epoch": 3} if lightning else tensors
        torch.save(top, path)
    return path


def diffusers_folder_from_single_file(root: Path, single_file: Path, orig, family: str) -> Path:
    """The same weights in the diffusers layout, converted by diffusers' own single-file loaders."""
    import yaml
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from ldm_fixtures import TEXT_WIDTH
    from transformers import CLIPTextModel

    config_path = root.parent / f"{root.name}.yaml"
    config_path.write_text(yaml.safe_dump(orig.yaml))
    unet = UNet2DConditionModel.from_single_file(str(single_file), original_config=str(config_path))
    vae = AutoencoderKL.from_single_file(str(single_file), original_config=str(config_path))
    if family == "sd1":
        text_config = orig.cond.transformer.config.to_dict()
    else:  # OpenCLIP tower: all but its last block (SD2 conditions on the penultimate layer)
        text_config = dict(
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act="gelu",
            vocab_size=49408,
            max_position_embeddings=77,
        )
    configs = root.parent / f"{root.name}-text-config"
    (configs / "text_encoder").mkdir(parents=True)
    (configs / "text_encoder" / "config.json").write_text(json.dumps(text_config))
    checkpoint = {k: torch.from_numpy(v) for k, v in orig.state.items()}
    text = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, subfolder="text_encoder", config=str(configs), local_files_only=True
    )
    return write_diffusers_folder(root, Reference(unet, vae, text), family=family)
