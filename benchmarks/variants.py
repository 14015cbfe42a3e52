"""Architectures measured against `Net` while choosing it; `bench.py --nets` trains any of them."""

from torch import nn

from model import ConvBNReLU, Net, Residual, SeparableConvBNReLU


class DeepNet(Net):
    """`Net` two layers deeper, paid for by a depthwise-separable stride-2 downsample.

    C1 wraps its second 3x3 conv in a residual shortcut, C2 gains a second 3x3 conv in its
    residual pair, and C4 a second separable conv; C2 -> C3 downsamples with a separable
    stride-2 conv, which frees ~65k of the 74k parameters a full 64 -> 128 stride-2 3x3 conv
    costs.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.c1 = nn.Sequential(
            ConvBNReLU(3, 32), Residual(ConvBNReLU(32, 32)), ConvBNReLU(32, 64, stride=2)
        )
        self.c2 = nn.Sequential(
            Residual(ConvBNReLU(64, 64), ConvBNReLU(64, 64, dilation=2)),
            SeparableConvBNReLU(64, 128, stride=2),
        )
        self.c4 = nn.Sequential(
            Residual(SeparableConvBNReLU(128, 128, dilation=2), SeparableConvBNReLU(128, 128))
        )
