"""What a source holds, ready to write: the `ModelPlan` every source reader (single file, diffusers folder) returns.

A plan reads nothing but headers and configs: each component is a `ComponentPlan` whose tensors are read one at a
time when the writer asks for them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlx_sd.t5_tokenizer import T5Tokenizer
from mlx_sd.tokenizer import CLIPTokenizer

from .families import family_config
from .keymap import ComponentPlan, ConversionError
from .ldm_detect import Detection, Finding


@dataclass(frozen=True)
class SourceFiles:
    """The files a component (or the whole model) was read from, for the manifest's hash.

    root: the folder names are given relative to (the file's folder for single files).
    names: the files read, relative to `root` (configs, weights, tokenizer files).
    """

    root: Path
    names: tuple[str, ...]


@dataclass(frozen=True)
class ModelPlan:
    """A whole model as found in a source.

    name: a display name (file stem, folder or repo name).
    kind: "single-file" or "diffusers".
    detection: what the source is, with the evidence (single files: detected; folders: read from the configs).
    components: component folder ("unet" or SD3's "transformer", "vae", "text_encoder", ...) -> its plan.
    tokenizers: tokenizer folder ("tokenizer", SD3's T5 "tokenizer_3") -> tokenizer.
    scheduler: the diffusers scheduler config to publish with the model.
    files: what the source was read from; `vae_files` when a separate VAE replaced the source's.
    details: other facts for the manifest's `source` entry (format, variant, hub revision...).
    """

    name: str
    kind: str
    detection: Detection
    components: dict[str, ComponentPlan]
    tokenizers: dict[str, CLIPTokenizer | T5Tokenizer]
    scheduler: dict
    files: SourceFiles
    details: dict = field(default_factory=dict)
    vae: VAESource | None = None

    @property
    def family(self) -> str:
        return self.detection.family.value

    @property
    def prediction_type(self) -> str:
        return self.detection.prediction_type.value

    @property
    def denoiser(self) -> str:
        """The denoising network's component folder: "unet", or "transformer" (SD3's MMDiT)."""
        return "transformer" if "transformer" in self.components else "unet"

    def with_vae(self, vae: VAESource) -> ModelPlan:
        """This model with `vae` as its VAE. A VAE file carries no latent scale (it lives in the original yaml):
        it takes this model's (SDXL: 0.13025, SD 1.x/2.x: 0.18215; SD3: 1.5305 after a 0.0609 shift), which a VAE
        swap must not change."""
        plan = vae.plan
        own = self.components.get("vae")
        own = own.config if own is not None else None
        if not vae.scale_known:
            published = family_config(self.family, "vae")
            scale = own.scaling_factor if own else published["scaling_factor"]
            shift = own.shift_factor if own else published.get("shift_factor", 0.0)
            plan = replace(plan, config=replace(plan.config, scaling_factor=scale, shift_factor=shift))
        channels = self.components[self.denoiser].config.out_channels
        if plan.config.latent_channels != channels:
            raise ConversionError(
                f"vae {vae.name}: {plan.config.latent_channels} latent channels, but this {self.family} model's "
                f"{self.denoiser} works on {channels}; pass a VAE made for {self.family}"
            )
        return replace(self, components={**self.components, "vae": plan}, vae=replace(vae, plan=plan))


def stored_dtype(header) -> str | None:
    """The dtype most of a checkpoint's tensors are stored in (a mapping with `.info(key)`, e.g. `Checkpoint`)."""
    counts = Counter(header.info(key).dtype for key in header)
    return counts.most_common(1)[0][0] if counts else None


@dataclass(frozen=True)
class VAESource:
    """A separately published VAE (`--vae`): its plan, where it came from and what it is."""

    name: str
    plan: ComponentPlan
    files: SourceFiles
    finding: Finding
    dtype: str | None  # how its weights are stored (most of them), e.g. "float32"
    scale_known: bool = True  # False for files, whose latent scaling factor the model supplies (`with_vae`)
