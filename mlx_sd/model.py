"""A converted model folder, loaded: components, tokenizers, schedule and what the converter recorded.

    model_folder/
      mlx_sd.json            manifest: family, prediction type, dtype, source file and sha256, converter version
      unet/ or transformer/ (SD3)  vae/  text_encoder/  [text_encoder_2/]  [text_encoder_3/] (SD3's T5)
                                                          config.json + weights.safetensors (MLX layout;
                                                          config.json records any quantization)
      tokenizer/  [tokenizer_2/]                          vocab.json + merges.txt + config.json
      [tokenizer_3/]                                      tokenizer.json (SD3's T5)
      scheduler/scheduler_config.json                     the diffusers scheduler config

`mlx_sd_convert` writes these folders; this module only reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .components import load_component
from .conditioning import PromptEncoder, T5Text, TextTower
from .t5_tokenizer import T5Tokenizer
from .tokenizer import CLIPTokenizer

MANIFEST = "mlx_sd.json"
FORMAT_VERSION = 1
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3")


@dataclass(frozen=True)
class ModelInfo:
    """The manifest of a converted folder.

    family: "sd1", "sd2", "sdxl", "sdxl-refiner" or "sd3" (decides conditioning and defaults).
    prediction_type: "epsilon" or "v_prediction" (also in the scheduler config; recorded with its evidence); "flow"
        for SD3 (rectified flow: velocity prediction, mlx_sd/schedules.py).
    name: a display name (the source file or repo name) for infotext and listings.
    sha256: of the source checkpoint file (A1111's "Model hash" is its first 10 hex digits), "" if unknown; for a
        diffusers folder, of the `sha256sum` lines ("<hash>  <path>\n", sorted by path) of the files read.
    source: what was converted: kind, format, the files read with their sha256, variant, hub repo and revision,
        a separately published VAE ("vae").
    detection: each finding (family, text_encoder, in_channels, ema, dtype, prediction_type, vae) as
        {"value", "confidence", "evidence"}.
    quantization: {"bits", "group_size", "mode"} when the UNet (SD3: MMDiT) and text encoders are quantized, else None.
    force_zeros_for_empty_prompt: SDXL base uses zero conditioning for an empty negative prompt (diffusers).
    requires_aesthetics_score: the SDXL refiner takes aesthetic scores in its micro-conditioning.
    kind: "" for a standard model, "turbo" (SD-Turbo, SDXL-Turbo: few steps, no guidance) or "lcm" (LCM-distilled).
    """

    family: str
    prediction_type: str
    name: str
    dtype: str = "float32"
    sha256: str = ""
    source: dict = field(default_factory=dict)
    detection: dict = field(default_factory=dict)
    converter_version: str = ""
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    quantization: dict | None = None
    kind: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, folder: str | Path) -> ModelInfo:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} is not an mlx-sd model folder (no {MANIFEST}); convert a checkpoint first: "
                f"mlx-sd convert SRC {folder}"
            )
        data = json.loads(path.read_text())
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{folder} was written by a newer mlx-sd (format {data['format_version']}); upgrade")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def denoiser_folder(info: ModelInfo) -> str:
    """The component folder of a model's denoising network: SD3's MMDiT is `transformer/` (as in diffusers)."""
    return "transformer" if info.family == "sd3" else "unet"


class StableDiffusion:
    """The networks of one model and how to drive them.

    Attributes:
        info: the manifest.
        unet: the denoising network: a UNet, or SD3's MMDiT (the folder's `transformer/`).
        vae: the autoencoder (in float32 unless asked otherwise: SD VAEs overflow in float16).
        text: the prompt encoder over one (SD1/SD2), two (SDXL) or three (SD3) text encoders; None after
            `release_text_encoders`.
        scheduler_config: the diffusers scheduler config dict the model was published with.
        folder: where it was loaded from.
    """

    def __init__(self, folder: str | Path, dtype: mx.Dtype | None = None, vae_dtype: mx.Dtype = mx.float32):
        from .backend import default_dtype

        self.folder = Path(folder)
        self.info = ModelInfo.read(self.folder)
        self.dtype = dtype or default_dtype()
        self.unet = load_component(self.folder / denoiser_folder(self.info), self.dtype)
        self.vae = self.load_vae(vae_dtype)
        self.scheduler_config = json.loads((self.folder / "scheduler" / "scheduler_config.json").read_text())
        self.text: PromptEncoder | None = self._load_text()

    def load_vae(self, dtype: mx.Dtype = mx.float32):
        """The VAE read from disk in `dtype` (a float16 VAE that overflowed is reloaded, not upcast)."""
        return load_component(self.folder / "vae", dtype)

    @property
    def is_sdxl(self) -> bool:
        return self.info.family.startswith("sdxl")

    @property
    def latent_format(self) -> str:
        """Which latent space previews read (`images.LATENT_RGB`): "sd", "sdxl" or "sd3"."""
        return "sd3" if self.is_sd3 else "sdxl" if self.is_sdxl else "sd"

    @property
    def is_sd3(self) -> bool:
        """An SD3 / SD3.5 model: MMDiT denoiser, rectified flow, CLIP-L + bigG + T5 conditioning."""
        return self.info.family == "sd3"

    @property
    def is_inpaint(self) -> bool:
        """A 9-channel UNet: latents + mask + masked-image latents."""
        return self.unet.config.in_channels == 9

    @property
    def is_edit(self) -> bool:
        """An 8-channel UNet: latents + the image to edit (InstructPix2Pix; mlx_sd/edit.py)."""
        return self.unet.config.in_channels == 8

    def _load_text(self) -> PromptEncoder:
        towers = []
        layer = "penultimate" if self.is_sdxl or self.is_sd3 else "final"
        # The SDXL refiner has only the second (bigG) tower.
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if (self.folder / enc).is_dir():
                towers.append(
                    TextTower(
                        CLIPTokenizer.from_folder(self.folder / tok),
                        load_component(self.folder / enc, self.dtype),
                        layer,
                        enc,
                    )
                )
        if not towers:
            raise FileNotFoundError(f"{self.folder}: no text_encoder folder")
        if not self.is_sd3:
            return PromptEncoder(towers)
        t5 = None, None
        if (self.folder / "text_encoder_3").is_dir():  # optional: diffusers conditions on zeros without it
            t5 = T5Tokenizer.from_folder(self.folder / "tokenizer_3"), load_component(self.folder / "text_encoder_3",
                                                                                       self.dtype)  # fmt: skip
        return PromptEncoder(towers, T5Text(*t5, width=self.unet.config.joint_attention_dim))

    def text_encoder(self) -> PromptEncoder:
        """The prompt encoder, reloaded from disk if `release_text_encoders` freed it."""
        if self.text is None:
            self.text = self._load_text()
        return self.text

    def release_text_encoders(self) -> None:
        """Free the text encoders' memory (low-memory mode); the next `text_encoder()` call reloads them."""
        self.text = None
        mx.clear_cache()
