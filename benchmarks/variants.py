"""Architectures measured against `Net` while choosing it; `bench.py --nets` trains any of them."""

from torch import nn

from model import ConvBNReLU, Net, Residual, SeparableConvBNReLU


class ShallowNet(Net):
    """The previous `Net`: two layers shallower, downsampling C2 -> C3 with a full 3x3 conv.

    C1 has no shortcut, C2's residual holds only the dilated conv, C4's only one separable conv,
    and C2 -> C3 downsamples with a full 64 -> 128 stride-2 3x3 conv (74k of its 194,410
    parameters). Its receptive field is 51 pixels.
    """

    def __init__(self, num_classes: int = 10) -> None:
        # Builds every layer itself, in the order the old `Net` did, so a seed draws the same
        # initial weights as it did then and the sweep's commands repeat their runs exactly.
        nn.Module.__init__(self)
        self.c1 = nn.Sequential(ConvBNReLU(3, 32), ConvBNReLU(32, 32), ConvBNReLU(32, 64, stride=2))
        self.c2 = nn.Sequential(
            Residual(ConvBNReLU(64, 64, dilation=2)), ConvBNReLU(64, 128, stride=2)
        )
        self.c3 = nn.Sequential(
            Residual(SeparableConvBNReLU(128, 128), SeparableConvBNReLU(128, 128))
        )
        self.c4 = nn.Sequential(Residual(SeparableConvBNReLU(128, 128, dilation=2)))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(128, num_classes, 1), nn.Flatten()
        )


class WideNet(ShallowNet):
    """`ShallowNet` with 192 channels instead of 128 at 8x8, paid for by a separable downsample.

    The full 64 -> 128 stride-2 3x3 conv costs 74k parameters; a depthwise-separable one to 192
    channels costs 13k, and the rest widens C3, C4 and the head (197,866 parameters in all,
    0.5% more multiply-adds than `ShallowNet`). It spends the freed parameters on width at 8x8,
    where today's `Net` spends them on extra layers.

    Args:
        num_classes: size of the output layer.
        width: channels of C3, C4 and the head; above 193 it breaks the 200,000-parameter budget.
    """

    def __init__(self, num_classes: int = 10, width: int = 192) -> None:
        super().__init__(num_classes)
        self.c2 = nn.Sequential(
            Residual(ConvBNReLU(64, 64, dilation=2)), SeparableConvBNReLU(64, width, stride=2)
        )
        self.c3 = nn.Sequential(
            Residual(SeparableConvBNReLU(width, width), SeparableConvBNReLU(width, width))
        )
        self.c4 = nn.Sequential(Residual(SeparableConvBNReLU(width, width, dilation=2)))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, num_classes, 1), nn.Flatten()
        )
