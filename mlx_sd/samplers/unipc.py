"""UniPC: a unified predictor-corrector multistep solver on the data prediction x0.

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models";
this follows diffusers' UniPCMultistepScheduler (predict_x0, "bh1"/"bh2") step for step, in VE space where a
VP formula's terms are divided by alpha_t and lambda = -log sigma. The corrector (UniC) refines the latent a
step produced once the model has been evaluated on it, so the latent yielded after step i is the predictor's;
the model output is not re-evaluated after correcting (the "free" corrector).
"""

from __future__ import annotations

import math

import numpy as np

from .common import emit


def _coefficients(h: float, rks: list[float], order: int, variant: str):
    """B(h), h*phi_1(h) and the right-hand side b of UniPC's order conditions (R rho = b), hh = -h."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    R, b, factorial = [], [], 1
    for i in range(1, order + 1):
        R.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, h_phi_1, np.array(R), np.array(b)


def _lambda(sigma: float) -> float:
    return math.inf if sigma == 0 else -math.log(sigma)


def _update(x, sigma_s0, sigma_t, m0, history, order, variant, model_t=None):
    """UniP (model_t None) or UniC (model_t given) from x at sigma_s0 to sigma_t; history: [(sigma, m), ...]
    before (sigma_s0, m0), newest last."""
    h = _lambda(sigma_t) - _lambda(sigma_s0)
    rks, d1s = [], []
    for k in range(1, order):
        sigma_k, m_k = history[-k]
        rks.append((_lambda(sigma_k) - _lambda(sigma_s0)) / h)
        d1s.append((m_k - m0) / rks[-1])
    b_h, h_phi_1, R, b = _coefficients(h, rks + [1.0], order, variant)
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * m0
    if model_t is None:  # predictor
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        return x_t - b_h * sum(float(r) * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)  # corrector
    correction = sum(float(r) * d for r, d in zip(rhos[:-1], d1s)) + float(rhos[-1]) * (model_t - m0)
    return x_t - b_h * correction


def unipc(denoiser, x, sigmas, rng=None, *, order=2, variant="bh2", lower_order_final=True, disable_corrector=()):
    """UniPC multistep (one model call per step).

    Args:
        order: the solver order (diffusers' `solver_order`, 1..3).
        variant: "bh1" or "bh2" (diffusers' `solver_type`).
        lower_order_final: lower the order on the last steps (order <= steps remaining).
        disable_corrector: step indices after which the corrector is skipped.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    if not 1 <= order <= 3:
        raise ValueError(f"UniPC order must be 1..3, got {order}")
    n = len(sigmas) - 1
    history = []  # [(sigma, x0 estimate)], newest last, at most `order`
    x_last, this_order = None, 1
    for i in range(n):
        sigma = sigmas[i]
        model_t = denoiser(x, sigma)
        if i > 0 and (i - 1) not in disable_corrector:
            sigma_s0, m0 = history[-1]
            x = _update(x_last, sigma_s0, sigma, m0, history[:-1], this_order, variant, model_t=model_t)
        history = (history + [(sigma, model_t)])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)  # warm-up: no more history than steps taken
        x_last = x
        x = _update(x, sigma, sigmas[i + 1], model_t, history[:-1], this_order, variant)
        x = yield from emit(x, x_last, *(m for _, m in history))
