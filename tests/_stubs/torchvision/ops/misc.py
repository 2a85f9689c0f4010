from torch import nn


class FrozenBatchNorm2d(nn.Module):  # imported by open_clip.utils, never used by the text tower
    pass
