"""Random LoRA files for the tiny reference models, in every dialect people download.

diffusers/PEFT files are made by peft and diffusers themselves (`add_adapter`, `get_peft_model_state_dict`,
`save_lora_weights`). kohya/A1111 files are written here from the published key convention (kohya-ss/sd-scripts
`networks/lora.py`: "lora_unet_" / "lora_te_" / "lora_te1_" / "lora_te2_" + the module path with "." -> "_",
`.lora_down.weight`, `.lora_up.weight`, `.alpha`), with module paths in diffusers naming or in the original LDM
naming (`input_blocks.{1 + s*(L+1) + j}.0` ...), which is what kohya's SDXL files and A1111/LyCORIS files use.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut"]  # fmt: skip
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# A1111-style LoRAs also adapt the convolutions outside the blocks (LoCon): conv_in, down/upsamplers.
LOCON_EXTRA = ["conv_in", "conv", "conv_out", "linear_1", "linear_2"]


def _randomize_lora(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_lora(parts: dict, folder: Path, seed: int, rank: int = 4, alpha: float | None = 2.0,
              text: bool = True, metadata: bool = True, dora: bool = False) -> Path:  # fmt: skip
    """A random LoRA trained-by-peft shape for `parts`' UNet and text encoders, saved by diffusers' save_lora_weights.

    Returns the .safetensors file. alpha None: no adapter config saved (diffusers then scales by 1). dora: a DoRA
    adapter (use_dora), its lora_magnitude_vector the rows' norms of W + scale * B A times 0.5..1.5 (as trained
    magnitudes drift from their initial norms).
    """
    from peft import LoraConfig, get_peft_model_state_dict

    def adapt(model, targets, offset):
        model = copy.deepcopy(model)
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=False,
                            use_dora=dora)  # fmt: skip
        model.add_adapter(config, adapter_name="a")
        _randomize_lora(model, seed + offset)
        if dora:
            drift_magnitudes(model, seed + offset)
        return get_peft_model_state_dict(model, adapter_name="a"), config.to_dict()

    layers, configs = {}, {}
    layers["unet_lora_layers"], configs["unet_lora_adapter_metadata"] = adapt(parts["unet"], UNET_TARGETS, 0)
    if text:
        for i, enc in enumerate(("text_encoder", "text_encoder_2")):
            if enc in parts:
                layers[f"{enc}_lora_layers"], configs[f"{enc}_lora_adapter_metadata"] = adapt(
                    parts[enc], TEXT_TARGETS, i + 1
                )
    pipeline_class = _pipeline_class(parts)
    pipeline_class.save_lora_weights(folder, **layers, **(configs if metadata and alpha else {}))
    return folder / "pytorch_lora_weights.safetensors"


def drift_magnitudes(model: torch.nn.Module, seed: int) -> None:
    """PEFT DoRA magnitudes set to the norm of each output row of W + scale * B A, times 0.5..1.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "a" not in getattr(module, "lora_magnitude_vector", {}):
                continue
            weight = module.get_base_layer().weight
            merged = weight + module.get_delta_weight("a").reshape(weight.shape)  # W + scale * B A
            magnitude = module.lora_magnitude_vector["a"].weight
            norms = merged.reshape(weight.shape[0], -1).norm(dim=1)
            drift = 0.5 + torch.rand(norms.shape, generator=g)
            magnitude.copy_((norms * drift).reshape(magnitude.shape))


def _pipeline_class(parts: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if "text_encoder_2" in parts else StableDiffusionPipeline


def random_lora_tensors(model: torch.nn.Module, targets, rank: int, seed: int, alpha: float | None = 3.0) -> dict:
    """module path -> (down, up, alpha) in torch layout for every Linear/Conv2d whose name ends with a target.

    Convolutions get conv downs of their own kernel (LoCon: 3x3 downs, 1x1 ups). One alpha for every layer, as
    kohya's trainer writes (network_alpha): diffusers 0.42 ignores per-layer alphas that differ (its alpha_pattern
    keys keep the "processor.to_q_lora.down.weight" spelling and match no module), so it cannot be the reference
    for those; A1111 and we scale each layer by its own alpha / rank.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, module in model.named_modules():
        if not any(name == t or name.endswith(f".{t}") for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            down = rng.normal(0, 0.2, (rank, module.in_features))
            up = rng.normal(0, 0.2, (module.out_features, rank))
        elif isinstance(module, torch.nn.Conv2d):
            down = rng.normal(0, 0.2, (rank, module.in_channels, *module.kernel_size))
            up = rng.normal(0, 0.2, (module.out_channels, rank, 1, 1))
        else:
            continue
        out[name] = (down.astype(np.float32), up.astype(np.float32), alpha)
    return out


def ldm_name(path: str, n_stages: int, layers: int, attention_stages: tuple[int, ...]) -> str:
    """The original-LDM module path of a diffusers UNet module path (the published SD block layout)."""
    leaves = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}  # fmt: skip
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
    if path in fixed:
        return fixed[path]
    parts = path.split(".")
    L = layers

    def resnet(prefix, rest):
        return f"{prefix}.{leaves[rest[0]]}" if rest[0] in leaves else f"{prefix}.{'.'.join(rest)}"

    if parts[0] == "down_blocks":
        s, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{1 + s * (L + 1) + L}.0.op"
        j = int(parts[3])
        prefix = f"input_blocks.{1 + s * (L + 1) + j}"
        return resnet(f"{prefix}.0", parts[4:]) if kind == "resnets" else f"{prefix}.1.{'.'.join(parts[4:])}"
    if parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
        rest = parts[3:]
        return resnet(f"middle_block.{index}", rest) if kind == "resnets" else f"middle_block.1.{'.'.join(rest)}"
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        has_attention = (n_stages - 1 - i) in attention_stages
        if kind == "upsamplers":
            return f"output_blocks.{i * (L + 1) + L}.{2 if has_attention else 1}.conv"
        j = int(parts[3])
        prefix = f"output_blocks.{i * (L + 1) + j}"
        return resnet(f"{prefix}.0", parts[4:]) if kind == "resnets" else f"{prefix}.1.{'.'.join(parts[4:])}"
    raise ValueError(f"no LDM name for {path}")


def kohya_state(tensors: dict, prefix: str, rename=lambda p: p, dtype=np.float16) -> dict[str, np.ndarray]:
    """kohya keys for `tensors` (module path -> (down, up, alpha)): prefix + renamed path with "." -> "_"."""
    state = {}
    for path, (down, up, alpha) in tensors.items():
        key = f"{prefix}_{rename(path).replace('.', '_')}"
        state[f"{key}.lora_down.weight"] = down.astype(dtype)
        state[f"{key}.lora_up.weight"] = up.astype(dtype)
        if alpha is not None:
            state[f"{key}.alpha"] = np.array(alpha, dtype=dtype)
    return state


def save_kohya(path: Path, state: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path), metadata=metadata or {"ss_network_module": "networks.lora"})
    else:
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return path
