"""Architectures measured against `Net`; `bench.py --nets` trains any of them."""

import numpy as np
import torch
from torch import nn

from model import ConvBNReLU, Net, Residual, SeparableConvBNReLU
from transforms import normalize_images


class HighResolutionNet(Net):
    """`Net`'s budget moved to 32x32 and 16x16, in full 3x3 convs (198,122 parameters).

    C1 (32x32) a 3x3 conv to 32 channels, then three residual pairs of 3x3 convs.
    C2 (16x16) a stride-2 3x3 conv to 64 channels, a residual pair (a 3x3 conv and a dilated one).
    C3, C4 (8x8) a separable stride-2 conv to 96 channels, two residual pairs of separable convs,
    C4's first dilated. Per parameter a conv at 32x32 does 16x the work of one at 8x8: 28% of its
    parameters do 68% of its 84.1 M multiply-adds (`Net`: 39% of the parameters at 8x8 do 11% of
    39.0 M). Receptive field 73 pixels.
    """

    def __init__(self, num_classes: int = 10) -> None:
        # Builds every layer in the order `Net` did when it was this net (commit 7f9ed43), so a
        # seed draws the same initial weights and its recorded runs repeat exactly.
        nn.Module.__init__(self)
        w1, w2, w3 = 32, 64, 96
        self.c1 = nn.Sequential(
            ConvBNReLU(3, w1),
            *(Residual(ConvBNReLU(w1, w1), ConvBNReLU(w1, w1)) for _ in range(3)),
        )
        self.c2 = nn.Sequential(
            ConvBNReLU(w1, w2, stride=2),
            Residual(ConvBNReLU(w2, w2), ConvBNReLU(w2, w2, dilation=2)),
        )
        self.c3 = nn.Sequential(
            SeparableConvBNReLU(w2, w3, stride=2),
            Residual(SeparableConvBNReLU(w3, w3), SeparableConvBNReLU(w3, w3)),
        )
        self.c4 = nn.Sequential(
            Residual(SeparableConvBNReLU(w3, w3, dilation=2), SeparableConvBNReLU(w3, w3)),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(w3, num_classes, 1), nn.Flatten()
        )


class MixedKernelBlock(nn.Module):
    """A residual block: depthwise convs of mixed reach on four channel groups, then a gated MLP.

    The channels split four ways: one group kept as it is; a depthwise 7x7; a 3x3 average then
    a depthwise 7x7 dilated by 3 (a 21-pixel reach for 49 weights); a depthwise 3x3. BatchNorm,
    a 1x1 conv to twice the width, split into a and b, Mish(a) * b, a 1x1 conv back, added to
    the input times a learned per-channel scale. After the block of
    github.com/xvel/cifar10-tiniest, with BatchNorm for its LayerNorm and Mish(a) for its
    tanh(exp(a)) * a, whose exp overflows in 16-bit floats (float16 above a = 11, bfloat16
    above 88) and then gives NaN gradients. The four depthwise groups and the 1x1 conv after
    them make a mixed-kernel depthwise-separable conv; the 3x3 group runs last so that
    `check_brief`, which pairs a depthwise 3x3 with the 1x1 conv run next, finds it.

    Args:
        channels: width in and out, a multiple of 4.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(
                f"MixedKernelBlock splits its channels four ways: {channels} is not a multiple of 4"
            )
        group = channels // 4
        self.wide = nn.Conv2d(group, group, 7, padding=3, groups=group, bias=False)
        self.dilated = nn.Sequential(
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
            nn.Conv2d(group, group, 7, padding=9, dilation=3, groups=group, bias=False),
        )
        self.depthwise = nn.Conv2d(group, group, 3, padding=1, groups=group, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, 2 * channels, 1)
        self.project = nn.Conv2d(channels, channels, 1)
        self.shortcut_scale = nn.Parameter(torch.ones(channels))  # 1-D: no weight decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled input plus the block's update."""
        kept, wide, dilated, local = x.chunk(4, dim=1)
        mixed = torch.cat([kept, self.wide(wide), self.dilated(dilated), self.depthwise(local)], 1)
        a, b = self.expand(self.norm(mixed)).chunk(2, dim=1)
        return x * self.shortcut_scale.view(1, -1, 1, 1) + self.project(nn.functional.mish(a) * b)


class MixedKernelNet(Net):
    """Mixed-kernel gated blocks at 32x32 and 16x16, no 8x8 stage (196,488 parameters).

    C1 (32x32) a 3x3 conv to 64 channels, two `MixedKernelBlock`s.
    C2 (32x32) a third block, then a grouped stride-2 3x3 conv to 120 channels (16x16).
    C3, C4 (16x16) three blocks in all.
    Head: global average pooling, a 1x1 conv to the classes.
    The shape of github.com/xvel/cifar10-tiniest (97,530 parameters; 94.4% reported there
    after 200 epochs with its own augmentation), widened to the brief's budget.
    """

    def __init__(self, num_classes: int = 10) -> None:
        nn.Module.__init__(self)
        w1, w2 = 64, 120
        self.c1 = nn.Sequential(ConvBNReLU(3, w1), MixedKernelBlock(w1), MixedKernelBlock(w1))
        self.c2 = nn.Sequential(MixedKernelBlock(w1), ConvBNReLU(w1, w2, stride=2, groups=8))
        self.c3 = nn.Sequential(MixedKernelBlock(w2), MixedKernelBlock(w2))
        self.c4 = nn.Sequential(MixedKernelBlock(w2))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(w2, num_classes, 1), nn.Flatten()
        )


class ShallowSeparableNet(Net):
    """`Net` before it grew: two layers shallower, a full 3x3 conv from C2 to C3.

    C1 has no shortcut, C2's residual holds only the dilated conv, C4's only one separable conv,
    and C2 -> C3 downsamples with a full 64 -> 128 stride-2 3x3 conv (74k of its 194,410
    parameters). Its receptive field is 51 pixels.
    """

    def __init__(self, num_classes: int = 10) -> None:
        # Builds every layer itself, in the order `Net` did when it was this net, so a seed
        # draws the same initial weights as then and the sweep's commands repeat their runs.
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


class WideSeparableNet(ShallowSeparableNet):
    """`ShallowSeparableNet` with 192 channels at 8x8 instead of 128, via a separable downsample.

    The full 64 -> 128 stride-2 3x3 conv costs 74k parameters; a depthwise-separable one to 192
    channels costs 13k, and the rest widens C3, C4 and the head (197,866 parameters in all, 0.5%
    more multiply-adds than `ShallowSeparableNet`). It spends the freed parameters on width at
    8x8, where `Net` spends them on extra layers.

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


# 5,000 images give 4.5 million 3x3 patches: plenty for a 27x27 covariance.
WHITENING_IMAGES = 5000
# airbench's floor under each variance, so a near-constant direction is not scaled up without bound.
WHITENING_EPS = 5e-4


def patch_components(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Variances (descending) and principal directions (rows) of normalised 3x3 patches.

    Computed over the first `WHITENING_IMAGES` of `images` (N x 32 x 32 x 3 uint8); each
    direction is a 27-vector laid out as a 3x3x3 conv filter (unfold's order is the conv's).
    """
    patches = nn.functional.unfold(normalize_images(images[:WHITENING_IMAGES]), kernel_size=3)
    patches = patches.transpose(1, 2).reshape(-1, 27).double()  # (patches, 27)
    variances, vectors = torch.linalg.eigh(torch.cov(patches.T))  # ascending
    return variances.flip(0).float(), vectors.flip(1).T.float()


class WhitenedNet(Net):
    """`Net` whose first conv is a frozen filter bank: principal components of patches.

    After airbench's patch-whitening layer: the first conv starts from, and keeps, the
    directions in which 3x3 image patches vary most, so the layers above it learn from
    decorrelated inputs from the first step instead of waiting for C1 to find such filters.
    Each of the 16 leading components (of 27) appears with both signs (32 filters), so the ReLU
    after it passes both halves of every direction; BatchNorm after the conv makes the scale of
    each component irrelevant, which is the whitening. The same layers as `Net`, 864 of
    their 184,234 parameters frozen. Build it with `bench.build_net`, which calls
    `init_from_data` with the training images: without that call it is a plain `Net`.
    """

    def init_from_data(self, images: np.ndarray) -> None:
        """Set and freeze the first conv from the principal components of `images`' patches."""
        conv = self.c1[0][0]
        variances, directions = patch_components(images)
        count = conv.out_channels // 2
        leading = directions[:count] / self.filter_divisors(variances[:count])[:, None]
        with torch.no_grad():
            conv.weight.copy_(torch.cat([leading, -leading]).view_as(conv.weight))
        conv.weight.requires_grad_(False)

    def filter_divisors(self, variances: torch.Tensor) -> torch.Tensor:
        """Ones: the BatchNorm after the conv already scales each component to unit variance."""
        return torch.ones_like(variances)


class UnnormalisedWhitenedNet(WhitenedNet):
    """`WhitenedNet` without the BatchNorm after the whitening conv, closer to airbench's layer.

    The frozen filters are scaled by 1 / sqrt(variance + WHITENING_EPS), so each one's response
    has about unit variance without BatchNorm; a trainable bias takes BatchNorm's shift. Still
    unlike airbench's: 3x3 patches, 16 of 27 components, centred covariance, ReLU, a bias never
    frozen. 184,202 parameters in all, 864 of them frozen.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.c1[0] = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True))
        nn.init.zeros_(self.c1[0][0].bias)  # the ReLU then splits each +/- filter pair at zero

    def filter_divisors(self, variances: torch.Tensor) -> torch.Tensor:
        """Each component's standard deviation, floored: with no BatchNorm, this whitens."""
        return (variances + WHITENING_EPS).sqrt()
