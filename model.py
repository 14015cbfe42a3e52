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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

INPUT_SHAPE = (3, 32, 32)
MAX_PARAMETERS = 200_000
MIN_RECEPTIVE_FIELD = 45  # the brief says "> 44"

# Channel widths of C1..C4. Params grow with width^2 but multiply-adds with width^2 * area:
# a channel at 32x32 costs 16x the multiply-adds of one at 8x8, so the 8x8 stages take the width.
WIDTHS = (32, 64, 128)  # C1, C2, C3; C4's residual adds its input to its output, so it keeps C3's


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
        w1, w2, w3 = WIDTHS
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
            Residual(SeparableConvBNReLU(w3, w3, dilation=2), SeparableConvBNReLU(w3, w3)),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(w3, num_classes, 1),
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


Field = tuple[int, int]  # (receptive field, jump) of one unit of a feature map, in input pixels

# Python's in-place operators; torch's in-place methods are the names ending in one "_".
_IN_PLACE_OPERATORS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"}
# The layers whose geometry the receptive field is measured from; every other op only passes it on.
_FIELD_LAYERS = (nn.Conv2d, *_POOLS)
_FIELD_MODULES = ", ".join(f"nn.{kind.__name__}" for kind in _FIELD_LAYERS)


def _tensors(value: object) -> list[torch.Tensor]:
    """The tensors in an op's arguments or result, however nested in lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _is_in_place(name: str) -> bool:
    """Whether a torch op of this name writes into its first argument."""
    return name in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))


class _FieldTracer(TorchFunctionMode):
    """Follows each tensor's field through every torch op of one forward pass.

    An op's result gets the widest field among its inputs: branches that are added, multiplied
    or concatenated see the union of their fields, which for fields on the same centre (the
    'same' padding of every net here) is the widest one, not their sum. Conv and pool modules
    set their own output's field (`_trace`'s hooks). What the tracer cannot see is refused
    rather than missed: a conv or pool outside those modules, and any other op that changes a
    map's size. Ops that mix pixels without either (attention, unfold) are not seen.
    Fields live here, keyed weakly by tensor, so nothing is left on the model's tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fields = WeakIdKeyDictionary()
        self.inside_layer = 0  # > 0 while a hooked conv or pool module runs

    def field(self, tensor: torch.Tensor) -> Field | None:
        """The tensor's field, widened by its base's if it is a view written through it."""
        known = [self.fields.get(t) for t in (tensor, tensor._base) if t is not None]
        return max((f for f in known if f is not None), default=None)

    def set_field(self, tensor: torch.Tensor, field: Field) -> None:
        """Record a field for the tensor and, as they share memory, for the view's base."""
        for target in (tensor, tensor._base):
            if target is not None:
                self.fields[target] = max(field, self.fields.get(target, field))

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        """Run the op, then give its results (and its target, if in place) their field."""
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if not self.inside_layer and ("conv" in name or "pool" in name):
            raise ValueError(
                f"{name} runs outside the modules the receptive field is measured from "
                f"({_FIELD_MODULES}): build that layer from one of them"
            )
        result = func(*args, **kwargs)
        inputs = [t for t in _tensors((args, kwargs)) if self.field(t) is not None]
        if not inputs:
            return result
        outputs = _tensors(result) + (_tensors(args[0]) if _is_in_place(name) else [])
        if not self.inside_layer:
            _refuse_resizing(name, inputs, outputs)
        field = max(self.field(t) for t in inputs)
        for tensor in outputs:
            self.set_field(tensor, field)
        return result


def _refuse_resizing(name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
    """Refuse an op outside a conv or pool module that gives a feature map a new size."""
    sizes = {tuple(t.shape[-2:]) for t in inputs if t.ndim == 4}
    for tensor in outputs:
        if tensor.ndim == 4 and sizes and tuple(tensor.shape[-2:]) not in sizes:
            raise ValueError(
                f"{name} turns a {sorted(sizes)[0]} map into {tuple(tensor.shape[-2:])} outside "
                f"the modules the receptive field is measured from ({_FIELD_MODULES}): "
                "resize with one of them (a strided conv or a pool)"
            )


def _trace(model: nn.Module) -> tuple[list[_Layer], Field]:
    """Every conv and pooling layer, in the order it runs, and the field of the model's output.

    Hooks record the order the layers actually run in, so nothing depends on how the
    model's attributes happen to be declared; `_FieldTracer` follows the tensors between
    them, through shortcuts and parallel branches.
    """
    names = {module: name for name, module in model.named_modules()}
    seen: list[_Layer] = []
    tracer = _FieldTracer()

    def enter(module: nn.Module, inputs: tuple) -> None:
        """Let the layer's own conv or pool op run."""
        tracer.inside_layer += 1

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Give the layer's output its field, from the map it read, and list the layer."""
        tracer.inside_layer -= 1
        side_in, side_out = inputs[0].shape[-1], output.shape[-1]
        kernel, stride, dilation = _geometry(module, side_in, side_out)
        field_in, jump_in = tracer.field(inputs[0]) or (1, 1)
        field, jump = field_in + (kernel - 1) * dilation * jump_in, jump_in * stride
        tracer.fields[output] = (field, jump)
        name = names[module]
        seen.append(_Layer(name, module, side_out, kernel, stride, dilation, jump, field, field_in))

    layers = [m for m in model.modules() if isinstance(m, _FIELD_LAYERS)]
    handles = [m.register_forward_pre_hook(enter) for m in layers]
    handles += [m.register_forward_hook(record) for m in layers]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        image = torch.zeros(1, *INPUT_SHAPE, device=device)
        tracer.fields[image] = (1, 1)
        with torch.no_grad(), tracer:
            output = model(image)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen, tracer.field(output) or (1, 1)


def receptive_field_table(model: nn.Module) -> list[LayerRF]:
    """Per-layer receptive field of each conv and pool, in the order they run.

    r_out = r_in + (k - 1) * dilation * j_in;  j_out = j_in * stride, where r_in and j_in are
    those of the map the layer reads. Shortcuts and parallel branches are followed as the
    tensors flow: where paths meet, the widest field wins (an identity shortcut changes
    nothing; two branches count as the wider one, not the sum). The table ends at global
    pooling (any pool with a 1x1 output, `AvgPool2d(8)` on an 8x8 map as much as
    `AdaptiveAvgPool2d(1)`). In a chain each row's field is the widest so far; in a net with
    parallel branches a row is its own branch's, so use `receptive_field` for the net's.
    """
    return _receptive_field_rows(_trace(model)[0])


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
    return _feature_receptive_field(*_trace(model))


def _feature_receptive_field(layers: list[_Layer], output: Field) -> int:
    """The field of the map global pooling reads; without global pooling, the output's."""
    pool = next((layer for layer in layers if layer.is_global_pool), None)
    return pool.input_receptive_field if pool is not None else output[0]


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


def _run_order(model: nn.Module) -> tuple[list[nn.Module], tuple[int, ...]]:
    """Every module in the order its forward pass ends, and the output's shape, for two zero images."""
    ran: list[nn.Module] = []

    def record(module: nn.Module, args: tuple, output: object) -> None:
        ran.append(module)

    handles = [m.register_forward_hook(record) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            shape = tuple(model(torch.zeros(2, *INPUT_SHAPE, device=device)).shape)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return ran, shape


def _weighted_layers_after(
    model: nn.Module, ran: list[nn.Module], pool: nn.Module, call: int
) -> list[nn.Module]:
    """The layers with weights in `ran` after the `call`-th run (from 0) of `pool`, in order.

    A layer with weights is a conv or linear layer (weight-normalised ones included, whose
    weights live in a child) or any module that holds parameters itself.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    inside = {id(part) for layer in layers for part in layer.modules() if part is not layer}
    pool_runs = [i for i, module in enumerate(ran) if module is pool]
    after = ran[pool_runs[call] + 1 :] if call < len(pool_runs) else []
    return [m for m in after if id(m) not in inside and (
        isinstance(m, (nn.Conv2d, nn.Linear)) or next(m.parameters(recurse=False), None) is not None
    )]


def check_brief(model: nn.Module, num_classes: int = 10) -> list[BriefCheck]:
    """Every rule of the brief, measured on the live model."""
    layers, output_field = _trace(model)
    gap = next((i for i, layer in enumerate(layers) if _is_global_average_pool(layer)), None)
    body = layers[:gap] if gap is not None else layers
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
    ran, outputs = _run_order(model)
    head = []
    if gap is not None:
        pool = layers[gap].module
        earlier_runs = sum(layer.module is pool for layer in layers[:gap])
        head = _weighted_layers_after(model, ran, pool, earlier_runs)
    head_is_1x1 = bool(head) and all(
        isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
        for m in head
    )
    params = sum(p.numel() for p in model.parameters())  # frozen weights count too
    rf = _feature_receptive_field(layers, output_field)
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
            (f"{layers[gap].name} -> " + (", ".join(_describe_head(m) for m in head) or "nothing"))
            if gap is not None else "no global average pooling",
            head_is_1x1,
        ),
        BriefCheck(f"{num_classes} outputs (logits)", f"shape {outputs}", outputs == (2, num_classes)),
    ]


def _describe_head(module: nn.Module) -> str:
    """What a layer after global pooling is, as the brief's head rule reads it."""
    if isinstance(module, nn.Conv2d):
        return "x".join(map(str, module.kernel_size))
    return "FC" if isinstance(module, nn.Linear) else type(module).__name__


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
