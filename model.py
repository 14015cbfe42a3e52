"""The CIFAR-10 network, and the checks of the brief on the live model.

The brief: blocks C1 C2 C3 C4 then an output head; no max-pooling (downsample with 3x3
stride-2 convs); receptive field > 44; at least one depthwise-separable and one dilated
conv; global average pooling then a 1x1 conv to the classes; < 200,000 parameters.
Every one of those is measured on the live model by `check_brief`, never asserted in prose.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

INPUT_SHAPE = (3, 32, 32)
MAX_PARAMETERS = 200_000
MIN_RECEPTIVE_FIELD = 45  # the brief says "> 44"

# Channel widths of C1..C4. Params grow with width^2 but multiply-adds with width^2 * area:
# a channel at 32x32 costs 16x the multiply-adds of one at 8x8, so the 8x8 stages take the width.
WIDTHS = (32, 64, 128, 128)  # C4's residual adds its input to its output: C4 keeps C3's width


class ConvBNReLU(nn.Sequential):
    """3x3 (or kxk) convolution, BatchNorm, ReLU; 'same' padding for any dilation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=False,  # BatchNorm's shift makes a conv bias redundant
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise-separable conv: a depthwise 3x3 (groups == channels), then a pointwise 1x1."""

    def __init__(
        self, in_channels: int, out_channels: int, dilation: int = 1, stride: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                in_channels,
                3,
                stride=stride,
                padding=dilation,
                dilation=dilation,
                groups=in_channels,
                bias=False,
            ),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Residual(nn.Module):
    """x + body(x): an identity shortcut, so the block can only add to what it is given."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input plus what the body adds to it."""
        return x + self.body(x)


class Net(nn.Module):
    """C1 C2 C3 C4 + head for 3x32x32 images; returns logits (use cross-entropy on them).

    Args:
        num_classes: size of the output layer.

    C1 (32x32) a 3x3 conv, a residual 3x3 conv, then a stride-2 3x3 down to 16x16.
    C2 (16x16) a residual pair: a 3x3 conv and a dilated 3x3 (dilation 2); then a separable
               stride-2 conv down to 8x8, 65k parameters cheaper than a full 3x3 conv.
    C3 (8x8)   a residual pair of depthwise-separable convs (full 3x3s would break the budget).
    C4 (8x8)   a residual pair of separable convs, the first with its depthwise 3x3 dilated.
    Head: global average pooling, then a 1x1 conv to the classes.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3, w4 = WIDTHS
        self.c1 = nn.Sequential(
            ConvBNReLU(3, w1),
            Residual(ConvBNReLU(w1, w1)),
            ConvBNReLU(w1, w2, stride=2),
        )
        self.c2 = nn.Sequential(
            Residual(ConvBNReLU(w2, w2), ConvBNReLU(w2, w2, dilation=2)),
            SeparableConvBNReLU(w2, w3, stride=2),
        )
        self.c3 = nn.Sequential(
            Residual(SeparableConvBNReLU(w3, w3), SeparableConvBNReLU(w3, w3)),
        )
        self.c4 = nn.Sequential(
            Residual(SeparableConvBNReLU(w3, w4, dilation=2), SeparableConvBNReLU(w4, w4)),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(w4, num_classes, 1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of 3x32x32 images."""
        if x.ndim != 4 or tuple(x.shape[1:]) != INPUT_SHAPE:
            raise ValueError(
                f"Net expects a batch of shape (N, 3, 32, 32); got {tuple(x.shape)}. "
                "Add a batch dimension with x.unsqueeze(0), or convert grey / resized "
                "images back to 3-channel 32x32 CIFAR-10 images."
            )
        return self.head(self.c4(self.c3(self.c2(self.c1(x)))))


@dataclass
class LayerRF:
    """One row of the receptive-field table: a spatial layer, in the order it runs."""

    layer: str
    kernel: int
    stride: int
    dilation: int
    output_size: int
    jump: int
    receptive_field: int


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class _Layer:
    """A conv or pooling layer as it ran: its module path, output side, geometry and field."""

    name: str
    module: nn.Module
    output_size: int
    kernel: int
    stride: int
    dilation: int
    jump: int  # input pixels between neighbouring units of its output
    receptive_field: int  # of one unit of its output
    input_receptive_field: int  # of one unit of the map it reads

    @property
    def is_global_pool(self) -> bool:
        """A pool whose output is 1x1: global pooling, however it is spelled."""
        return isinstance(self.module, _POOLS) and self.output_size == 1


def _geometry(module: nn.Module, input_size: int, output_size: int) -> tuple[int, int, int]:
    """(kernel, stride, dilation) of a conv or pooling layer, as it ran on its input.

    An adaptive pool has no fixed kernel: from its input and output sides it acts as a pool
    of kernel ceil(in / out) and stride in // out (a global pool: kernel and stride = in).
    """
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return -(-input_size // output_size), max(1, input_size // output_size), 1

    def first(value: int | tuple[int, ...]) -> int:
        return value[0] if isinstance(value, tuple) else value

    dilation = getattr(module, "dilation", 1)
    return first(module.kernel_size), first(module.stride), first(dilation)


# Each tensor of the traced forward pass carries its (receptive field, jump) in this attribute.
_FIELD = "_s9_receptive_field"


def _tensors(value: object) -> list[torch.Tensor]:
    """The tensors in an op's arguments or result, however nested in lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


class _FieldTracer(TorchFunctionMode):
    """Carries each tensor's (receptive field, jump) through every torch op of a forward pass.

    An op's result gets the widest field among its inputs: branches that are added, multiplied
    or concatenated see the union of their fields, which for fields on the same centre is the
    widest one, not their sum. Conv and pool modules set their own output's field (in
    `_spatial_layers`' hooks); a functional conv or pool would be missed, so it is refused.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inside_layer = 0  # > 0 while a hooked conv or pool module runs

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if not self.inside_layer and ("conv" in name or "pool" in name):
            raise ValueError(
                f"the receptive field is measured on conv and pool modules, but the forward "
                f"pass calls {name} directly: use the nn.Module (nn.Conv2d, nn.AvgPool2d, ...)"
            )
        result = func(*args, **(kwargs or {}))
        fields = [getattr(t, _FIELD) for t in _tensors((args, kwargs)) if hasattr(t, _FIELD)]
        if fields:
            for tensor in _tensors(result):
                setattr(tensor, _FIELD, max(fields))
        return result


def _spatial_layers(model: nn.Module) -> list[_Layer]:
    """Every conv and pooling layer, in the order the forward pass runs them, with its field.

    Hooks record the order the layers actually run in, so nothing depends on how the
    model's attributes happen to be declared; `_FieldTracer` follows the tensors between
    them, through shortcuts and parallel branches.
    """
    names = {module: name for name, module in model.named_modules()}
    seen: list[_Layer] = []
    tracer = _FieldTracer()

    def enter(module: nn.Module, inputs: tuple) -> None:
        tracer.inside_layer += 1

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        tracer.inside_layer -= 1
        side_in, side_out = inputs[0].shape[-1], output.shape[-1]
        kernel, stride, dilation = _geometry(module, side_in, side_out)
        field_in, jump_in = getattr(inputs[0], _FIELD, (1, 1))
        field, jump = field_in + (kernel - 1) * dilation * jump_in, jump_in * stride
        setattr(output, _FIELD, (field, jump))
        seen.append(_Layer(names[module], module, side_out, kernel, stride, dilation, jump, field, field_in))

    kinds = (nn.Conv2d, *_POOLS)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    handles = [m.register_forward_pre_hook(enter) for m in layers]
    handles += [m.register_forward_hook(record) for m in layers]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        image = torch.zeros(1, *INPUT_SHAPE, device=device)
        setattr(image, _FIELD, (1, 1))
        with torch.no_grad(), tracer:
            model(image)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def receptive_field_table(model: nn.Module) -> list[LayerRF]:
    """Per-layer receptive field of each conv and pool, in the order they run.

    r_out = r_in + (k - 1) * dilation * j_in;  j_out = j_in * stride, where r_in and j_in are
    those of the map the layer reads. Shortcuts and parallel branches are followed as the
    tensors flow: where paths meet, the widest field wins (an identity shortcut changes
    nothing; two branches count as the wider one, not the sum). The table ends at global
    pooling (any pool with a 1x1 output, `AvgPool2d(8)` on an 8x8 map as much as
    `AdaptiveAvgPool2d(1)`).
    """
    return _receptive_field_rows(_spatial_layers(model))


def _receptive_field_rows(layers: list[_Layer]) -> list[LayerRF]:
    """The rows of `receptive_field_table`: the layers before the first global pool."""
    rows: list[LayerRF] = []
    for layer in layers:
        if layer.is_global_pool:
            break
        rows.append(
            LayerRF(layer.name, layer.kernel, layer.stride, layer.dilation, layer.output_size,
                    layer.jump, layer.receptive_field)
        )
    return rows


def receptive_field(model: nn.Module) -> int:
    """Receptive field (pixels) of one unit of the last feature map before global pooling."""
    return _feature_receptive_field(_spatial_layers(model))


def _feature_receptive_field(layers: list[_Layer]) -> int:
    """The field of the map global pooling reads; without one, of the last layer's output.

    1 px for a net without spatial layers.
    """
    pool = next((layer for layer in layers if layer.is_global_pool), None)
    if pool is not None:
        return pool.input_receptive_field
    return layers[-1].receptive_field if layers else 1


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class BriefCheck:
    """One rule of the brief, the value measured on the model, and whether it holds."""

    rule: str
    measured: str
    passed: bool


def _separable_pairs(layers: list[_Layer]) -> list[str]:
    """Depthwise 3x3 convs (groups == channels) whose next conv is a 1x1 pointwise conv."""
    convs = [(layer.name, layer.module) for layer in layers if isinstance(layer.module, nn.Conv2d)]
    pairs = []
    for (name, conv), (_, nxt) in zip(convs, convs[1:]):
        depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
        pointwise = nxt.kernel_size == (1, 1) and nxt.groups == 1
        if depthwise and conv.kernel_size == (3, 3) and pointwise:
            pairs.append(name)
    return pairs


def _is_global_average_pool(layer: _Layer) -> bool:
    """An average pool whose output is 1x1: global average pooling, however it is spelled."""
    return layer.is_global_pool and isinstance(layer.module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d))


def _output_shape(model: nn.Module) -> tuple[int, ...]:
    """Shape of the model's output for a batch of two zero images."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            return tuple(model(torch.zeros(2, *INPUT_SHAPE, device=device)).shape)
    finally:
        model.train(was_training)


def check_brief(model: nn.Module, num_classes: int = 10) -> list[BriefCheck]:
    """Every rule of the brief, measured on the live model."""
    layers = _spatial_layers(model)
    gap = next((i for i, layer in enumerate(layers) if _is_global_average_pool(layer)), None)
    body, head = (layers[:gap], layers[gap + 1 :]) if gap is not None else (layers, [])
    convs = [layer for layer in body if isinstance(layer.module, nn.Conv2d)]
    blocks = [name for name in ("c1", "c2", "c3", "c4", "head") if hasattr(model, name)]
    maxpools = [n for n, m in model.named_modules() if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))]
    strided = [layer for layer in body if layer.stride > 1]
    bad_downsamplers = [
        layer.name for layer in strided
        if not (isinstance(layer.module, nn.Conv2d) and layer.kernel == 3 and layer.stride == 2)
    ]
    dilated = [layer.name for layer in convs if layer.dilation > 1]
    separable = _separable_pairs(body)
    head_is_1x1 = gap is not None and all(
        isinstance(layer.module, nn.Conv2d) and layer.module.kernel_size == (1, 1) for layer in head
    )
    params = count_parameters(model)
    rf = _feature_receptive_field(layers)
    outputs = _output_shape(model)
    return [
        BriefCheck("blocks C1 C2 C3 C4 + head", ", ".join(blocks), len(blocks) == 5),
        BriefCheck("parameters < 200,000", f"{params:,}", params < MAX_PARAMETERS),
        BriefCheck("no max-pooling", f"{len(maxpools)} max-pool layers", not maxpools),
        BriefCheck(
            "downsampling only by 3x3 stride-2 convs",
            f"not 3x3 stride-2 convs: {', '.join(bad_downsamplers)}" if bad_downsamplers
            else f"{len(strided)} stride-2 3x3 convs",
            not bad_downsamplers,
        ),
        BriefCheck(f"receptive field > {MIN_RECEPTIVE_FIELD - 1}", f"{rf} px", rf >= MIN_RECEPTIVE_FIELD),
        BriefCheck("a dilated conv", ", ".join(dilated) or "none", bool(dilated)),
        BriefCheck("a depthwise-separable conv", ", ".join(separable) or "none", bool(separable)),
        BriefCheck(
            "global average pooling, then 1x1 conv/FC",
            f"{layers[gap].name} -> 1x1" if gap is not None else "no global average pooling",
            head_is_1x1,
        ),
        BriefCheck(f"{num_classes} outputs (logits)", f"shape {outputs}", outputs == (2, num_classes)),
    ]


def model_summary(model: nn.Module) -> str:
    """The torchsummary table for a 3x32x32 input, from an eval-mode copy of `model`."""
    from torchsummary import summary

    # torchsummary runs a forward pass: on the live model in train mode it would nudge the
    # BatchNorm running statistics. It knows only "cuda" and "cpu": other devices use the CPU.
    target = copy.deepcopy(model).eval()
    if next(target.parameters()).device.type not in ("cuda", "cpu"):
        target.cpu()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        summary(target, INPUT_SHAPE, device=next(target.parameters()).device.type)
    return buffer.getvalue()
