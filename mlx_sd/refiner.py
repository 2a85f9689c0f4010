"""The SDXL refiner hand-off: the base model denoises the noisiest part of the schedule, the refiner the rest.

One sampler run walks the whole schedule. Its model function is the base model's until the first evaluation
whose timestep falls below the cutoff, and the refiner's from then on (with the refiner's own prompt encoding and
micro-conditioning: bigG alone, aesthetic scores). This is how AUTOMATIC1111 runs a refiner (`apply_refiner` swaps
the model inside the running sampler, which carries on with its history and noise).

The cutoff is diffusers': the base runs the timesteps t >= round(N * (1 - switch_at)) and the refiner the rest, N
being the training steps (StableDiffusionXLPipeline(denoising_end=switch_at), then
StableDiffusionXLImg2ImgPipeline(denoising_start=switch_at) on its latents). A1111's default "switch by timestep"
rule, (N - 1 - t) / N >= switch_at, is the same for integer timesteps when switch_at * N is an integer. A fractional
timestep (Karras sigmas, ...) counts as the nearest entry of the training table, as in A1111.

For first-order samplers (Euler and Euler a, SDXL's published scheduler) carrying on is exactly diffusers' two
pipelines run one after the other. Multistep samplers (DPM++ 2M, ...) keep their history across the switch as
A1111's do; diffusers starts the refiner's scheduler afresh, so its first refiner step is first order.
"""

from __future__ import annotations

import numpy as np

from .denoiser import ModelFn
from .schedules import NoiseSchedule

DEFAULT_SWITCH_AT = 0.8  # A1111's default "Switch at"; diffusers' documented high_noise_frac


def switch_cutoff(schedule: NoiseSchedule, switch_at: float) -> int:
    """The first timestep the base no longer runs: diffusers' `discrete_timestep_cutoff`."""
    n = schedule.num_train_timesteps
    return int(round(n - switch_at * n))


class Handoff:
    """A model function that is `base` above the cutoff and `refiner` from the first timestep below it on;
    `switched` tells whether the refiner has taken over (inpainting then pastes the known region back, the refiner
    being a 4-channel UNet).

    Args:
        base, refiner: model functions `(x, t) -> output`, each closed over its own conditioning.
        schedule: the training schedule both models share (the timesteps' noise levels).
        switch_at: the fraction of the schedule (0, 1] the base runs; 1 never switches.
    """

    def __init__(self, base: ModelFn, refiner: ModelFn, schedule: NoiseSchedule, switch_at: float):
        self.base, self.refiner, self.schedule = base, refiner, schedule
        self.cutoff = switch_cutoff(schedule, switch_at)
        self.switched = False

    def __call__(self, x, t: float):
        if not self.switched:
            nearest = int(np.argmin(np.abs(self.schedule.sigmas - self.schedule.t_to_sigma(t))))
            self.switched = nearest < self.cutoff
        return (self.refiner if self.switched else self.base)(x, t)


def check_refiner(base, refiner, base_schedule: NoiseSchedule, refiner_schedule: NoiseSchedule) -> None:
    """Raise ValueError unless `refiner` can take over `base`'s latents mid-schedule: the same latent space (VAE
    channels and scaling factor), the same training noise schedule and prediction type, a 4-channel UNet.

    Args:
        base, refiner: `mlx_sd.model.StableDiffusion` models.
        base_schedule, refiner_schedule: their noise schedules.
    """
    b, r = base.vae.config, refiner.vae.config
    problems = []
    if (b.latent_channels, b.scaling_factor) != (r.latent_channels, r.scaling_factor):
        problems.append(
            f"latent spaces differ ({b.latent_channels} channels x {b.scaling_factor} vs "
            f"{r.latent_channels} x {r.scaling_factor})"
        )
    if base_schedule != refiner_schedule:
        problems.append("their training noise schedules or prediction types differ")
    if refiner.unet.config.in_channels != r.latent_channels:
        problems.append(f"the refiner's UNet takes {refiner.unet.config.in_channels} channels (an inpainting UNet?)")
    if problems:
        raise ValueError(
            f"{refiner.info.name} cannot refine {base.info.name}: " + "; ".join(problems) + ". Use a refiner made "
            "for the base model (SDXL base 1.0 -> SDXL refiner 1.0)"
        )
