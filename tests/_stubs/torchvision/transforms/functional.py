"""Imported by k_diffusion.utils and spandrel's LaMa; neither path the tests run calls it (LaMa's rotation is a
training-time spatial transform big-lama does not use)."""


class InterpolationMode:
    BILINEAR = "bilinear"


def rotate(*args, **kwargs):
    raise NotImplementedError("torchvision stand-in: rotate is not available in the tests")
