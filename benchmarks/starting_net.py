"""The net we started from, rebuilt from its description, for side-by-side benchmarks.

All 44 channels; three 3x3 convs per block with a stride-2 conv ending C1-C3; a dilated conv
in C2; a depthwise-separable conv in C4; AvgPool(4) and a linear layer. About 180k parameters
and 36.7 M multiply-adds per image. Only the architecture is reproduced: it is trained here
with our recipe, so the comparison isolates the network.
"""

import torch
from torch import nn

from model import ConvBNReLU, SeparableConvBNReLU

WIDTH = 44


class StartingNet(nn.Module):
    """The all-44-channel starting network (logits out)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        w = WIDTH
        self.c1 = nn.Sequential(ConvBNReLU(3, w), ConvBNReLU(w, w), ConvBNReLU(w, w, stride=2))
        self.c2 = nn.Sequential(
            ConvBNReLU(w, w), ConvBNReLU(w, w, dilation=2), ConvBNReLU(w, w, stride=2)
        )
        self.c3 = nn.Sequential(ConvBNReLU(w, w), ConvBNReLU(w, w), ConvBNReLU(w, w, stride=2))
        self.c4 = nn.Sequential(ConvBNReLU(w, w), SeparableConvBNReLU(w, w), ConvBNReLU(w, w))
        self.head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of 3x32x32 images."""
        return self.head(self.c4(self.c3(self.c2(self.c1(x)))))
