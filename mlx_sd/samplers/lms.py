"""LMS: linear multistep (Adams-Bashforth in sigma) on the ODE derivative, up to fourth order.

k-diffusion `sample_lms` and diffusers' LMSDiscreteScheduler integrate the Lagrange polynomial through the last
`order` derivatives over [sigma_i, sigma_i+1] with scipy's `quad`; the integrand is a polynomial of degree < 4,
so integrating it exactly (numpy) gives the same coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.polynomial import polynomial as P

from .common import emit, to_d


def lms_coefficient(sigmas: Sequence[float], i: int, order: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node sigmas[i - j] among the
    nodes sigmas[i], ..., sigmas[i - order + 1]."""
    nodes = [sigmas[i - k] for k in range(order) if k != j]
    basis = P.polyfromroots(nodes) / np.prod([sigmas[i - j] - s for s in nodes])
    antiderivative = P.polyint(basis)
    return float(P.polyval(sigmas[i + 1], antiderivative) - P.polyval(sigmas[i], antiderivative))


def lms(denoiser, x, sigmas, rng=None, *, order=4, skipped_sigmas=()):
    """Linear multistep steps (one model call per step), of order min(step + 1, `order`).

    `skipped_sigmas`: for img2img as diffusers runs it, the noise levels of the steps that were skipped. diffusers'
    coefficients keep the step index of the full schedule (so they reach back to sigmas that were never visited),
    while only the derivatives of the steps that ran are summed; k-diffusion/A1111 start afresh (the default).
    """
    if not 1 <= order <= 4:
        raise ValueError(f"LMS order must be 1..4, got {order}")
    all_sigmas = [float(s) for s in skipped_sigmas] + [float(s) for s in sigmas]
    offset = len(skipped_sigmas)
    ds = []
    for i in range(len(sigmas) - 1):
        g = offset + i  # the step index in the full schedule
        ds.append(to_d(x, sigmas[i], denoiser(x, sigmas[i])))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(g + 1, order)
        coeffs = [lms_coefficient(all_sigmas, g, cur_order, j) for j in range(min(cur_order, len(ds)))]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        x = yield from emit(x, *ds)
