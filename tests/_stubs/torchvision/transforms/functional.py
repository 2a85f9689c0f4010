"""Imported by k_diffusion.utils; the sampling functions never call it."""
