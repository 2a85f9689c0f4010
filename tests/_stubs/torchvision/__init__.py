"""Test-only stand-in for torchvision.

PyPI's torchvision does not load beside the CPU torch wheel the tests use ("operator torchvision::nms does not
exist"), yet open_clip and k-diffusion import it at module level for features the oracles never touch.
"""
