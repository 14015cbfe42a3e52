"""The network meets the brief, and the brief checks catch a network that does not."""

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from benchmarks.bench import NETS
from model import (
    MAX_PARAMETERS,
    Net,
    SeparableConvBNReLU,
    check_brief,
    count_parameters,
    model_summary,
    receptive_field,
    receptive_field_table,
)


def conv(stride: int = 1, dilation: int = 1, channels: int = 3) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride=stride, dilation=dilation, padding=dilation)


@pytest.mark.parametrize(
    "layers, expected",
    [
        ([conv()], 3),
        ([conv(), conv()], 5),
        ([conv(stride=2), conv()], 7),
        ([conv(dilation=2)], 5),
        ([conv(stride=2), conv(stride=2), conv()], 15),
        ([conv(stride=2), conv(dilation=2)], 11),
        ([conv(), nn.MaxPool2d(2), conv()], 8),
    ],
)
def test_receptive_field_of_hand_checked_stacks(layers: list[nn.Module], expected: int) -> None:
    assert receptive_field(nn.Sequential(*layers)) == expected


@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d(1), nn.AvgPool2d(32)])
def test_receptive_field_stops_at_global_pooling_however_it_is_spelled(pool: nn.Module) -> None:
    stack = nn.Sequential(conv(), pool, nn.Conv2d(3, 10, 1))
    assert receptive_field(stack) == 3


def test_a_non_global_adaptive_pool_counts_as_the_pool_it_acts_as() -> None:
    stack = nn.Sequential(conv(), nn.AdaptiveAvgPool2d(16), conv())  # a 2x2 stride-2 pool
    assert receptive_field(stack) == receptive_field(nn.Sequential(conv(), nn.AvgPool2d(2), conv()))


def test_net_with_a_fixed_size_global_pool_measures_the_same() -> None:
    net = Net()
    net.head[0] = nn.AvgPool2d(8)  # the 8x8 map pooled to 1x1: global pooling spelled otherwise
    assert receptive_field(net) == receptive_field(Net())
    assert all(row.passed for row in check_brief(net))


def test_a_strided_adaptive_pool_in_the_body_fails_the_downsampling_rule() -> None:
    net = Net()
    net.c3.insert(0, nn.AdaptiveAvgPool2d(4))
    rows = {row.rule: row for row in check_brief(net)}
    assert not rows["downsampling only by 3x3 stride-2 convs"].passed
    assert "c3.0" in rows["downsampling only by 3x3 stride-2 convs"].measured


class Branches(nn.Module):
    """Parallel paths over one input, merged by `merge` ("add", "mul" or "cat")."""

    def __init__(self, *paths: nn.Module, merge: str = "add") -> None:
        super().__init__()
        self.paths = nn.ModuleList(paths)
        self.merge = merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [path(x) for path in self.paths]
        if self.merge == "cat":
            return torch.cat(outputs, dim=1)
        result = outputs[0]
        for output in outputs[1:]:
            result = result + output if self.merge == "add" else result * output
        return result


@pytest.mark.parametrize("merge", ["add", "mul", "cat"])
def test_parallel_branches_count_as_the_widest_not_the_sum(merge: str) -> None:
    wide = nn.Sequential(conv(), conv(dilation=2))  # 7 px
    narrow = nn.Sequential(conv(), conv())  # 5 px
    channels = 9 if merge == "cat" else 3
    stack = nn.Sequential(Branches(narrow, wide, nn.Identity(), merge=merge), conv(channels=channels))
    assert receptive_field(stack) == 7 + 2
    assert receptive_field(stack) == measured_field_of(stack)


def test_a_strided_projection_shortcut_adds_nothing_to_the_main_path() -> None:
    main = nn.Sequential(conv(stride=2), conv())  # 3 + 2 * 2 = 7 px, jump 2
    shortcut = nn.Conv2d(3, 3, 1, stride=2)
    stack = nn.Sequential(Branches(main, shortcut), conv())
    assert receptive_field(stack) == 7 + 2 * 2
    assert receptive_field(stack) == measured_field_of(stack)


def test_a_branch_that_pools_then_convolves_counts_both() -> None:
    pooled = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(3, 3, 7, padding=9, dilation=3))
    stack = Branches(nn.Identity(), conv(), pooled, merge="cat")
    assert receptive_field(stack) == 3 + 6 * 3
    assert receptive_field(stack) == measured_field_of(stack)


def test_a_functional_conv_is_refused_rather_than_missed() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 3, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv2d(x, self.weight, padding=1)

    with pytest.raises(ValueError, match=r"conv2d runs outside the modules .* build that layer"):
        receptive_field(nn.Sequential(conv(), Functional()))


class Lambda(nn.Module):
    """A forward pass written as a function of the input and the given submodules."""

    def __init__(self, forward: Callable[..., torch.Tensor], *parts: nn.Module) -> None:
        super().__init__()
        self.function = forward
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, *self.parts)


def test_a_map_written_in_place_takes_the_field_written_into_it() -> None:
    def overwrite(x: torch.Tensor, deep: nn.Module) -> torch.Tensor:
        out = x.clone()
        out[:, :1] = deep(x)[:, :1]
        return out

    stack = nn.Sequential(conv(), Lambda(overwrite, nn.Sequential(conv(), conv())), nn.Conv2d(3, 3, 1))
    assert receptive_field(stack) == 7
    assert receptive_field(stack) == measured_field_of(stack)


def test_a_map_resized_outside_a_module_is_refused_rather_than_missed() -> None:
    with pytest.raises(ValueError, match=r"turns a \(32, 32\) map into \(16, 16\) .*a strided conv"):
        receptive_field(nn.Sequential(conv(), Lambda(lambda x: x[..., ::2, ::2]), conv()))


def test_without_global_pooling_the_field_is_the_output_s_not_the_last_layer_s() -> None:
    stack = Branches(nn.Sequential(conv(), conv(dilation=2)), conv())  # the narrow branch runs last
    assert receptive_field(stack) == 7 == measured_field_of(stack)


def test_net_receptive_field_exceeds_44_and_table_is_consistent() -> None:
    net = Net()
    table = receptive_field_table(net)
    assert receptive_field(net) == table[-1].receptive_field > 44
    assert [row.output_size for row in table][0] == 32
    assert table[-1].output_size == 8
    assert all(a.receptive_field <= b.receptive_field for a, b in zip(table, table[1:]))


def test_net_passes_every_rule_of_the_brief() -> None:
    rows = check_brief(Net())
    failed = [row for row in rows if not row.passed]
    assert not failed, failed
    assert len(rows) == 9


def test_net_is_small_and_returns_logits() -> None:
    net = Net().eval()
    assert count_parameters(net) < MAX_PARAMETERS
    out = net(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    # Logits, not log-probabilities or probabilities: neither they nor their exponentials
    # sum to one.
    assert not torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-3)
    assert not torch.allclose(out.sum(1), torch.ones(4), atol=1e-3)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 28, 28), (3, 32, 32)])
def test_net_rejects_wrong_input_shapes_with_the_expected_shape(shape: tuple) -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        Net()(torch.randn(*shape))


class BriefNet(nn.Module):
    """A net that satisfies the brief until one part of it is swapped out."""

    def __init__(self, **parts: nn.Module) -> None:
        super().__init__()
        default = {
            "c1": nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()),
            "c2": nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU()),
            "c3": nn.Sequential(nn.Conv2d(16, 16, 3, padding=8, dilation=8), nn.ReLU()),
            "c4": nn.Sequential(SeparableConvBNReLU(16, 16, dilation=4)),
            "head": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 10, 1), nn.Flatten()),
        }
        default.update(parts)
        for name, module in default.items():
            setattr(self, name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("c1", "c2", "c3", "c4", "head"):
            x = getattr(self, name)(x)
        return x


def failed_rules(net: nn.Module) -> set[str]:
    return {row.rule for row in check_brief(net) if not row.passed}


def test_the_reference_brief_net_passes() -> None:
    assert failed_rules(BriefNet()) == set()


@pytest.mark.parametrize(
    "parts, rule",
    [
        ({"c2": nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.MaxPool2d(2))}, "no max-pooling"),
        ({"c2": nn.Sequential(nn.Conv2d(16, 16, 1, stride=2))}, "downsampling only by 3x3 stride-2 convs"),
        ({"c2": nn.Sequential(nn.Conv2d(16, 16, 3, stride=3, padding=1))}, "downsampling only by 3x3 stride-2 convs"),
        ({"c3": nn.Sequential(conv(channels=16)), "c4": SeparableConvBNReLU(16, 16)}, "a dilated conv"),
        ({"c4": nn.Sequential(conv(dilation=4, channels=16))}, "a depthwise-separable conv"),
        ({"head": nn.Sequential(nn.Flatten(), nn.LazyLinear(10))}, "global average pooling, then 1x1 conv/FC"),
        # classes scored before the pool, nothing after it
        ({"head": nn.Sequential(nn.Conv2d(16, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())}, "global average pooling, then 1x1 conv/FC"),
        ({"head": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 10, 3, padding=1), nn.Flatten())}, "global average pooling, then 1x1 conv/FC"),
        ({"head": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 7, 1), nn.Flatten())}, "10 outputs (logits)"),
        ({"c3": nn.Sequential(nn.Conv2d(16, 16, 1))}, "receptive field > 44"),
        ({"c3": nn.Sequential(nn.Conv2d(16, 16, 3, padding=8, dilation=8), nn.Conv2d(16, 2048, 1), nn.Conv2d(2048, 16, 3, padding=1))}, "parameters < 200,000"),
    ],
)
def test_brief_check_fails_a_net_that_breaks_one_rule(parts: dict, rule: str) -> None:
    assert rule in failed_rules(BriefNet(**parts))


def test_brief_check_takes_a_fully_connected_layer_after_the_pool() -> None:
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    rows = {row.rule: row for row in check_brief(BriefNet(head=head))}
    assert all(row.passed for row in rows.values())
    assert rows["global average pooling, then 1x1 conv/FC"].measured == "head.0 -> FC"


def test_brief_check_sees_weight_normalised_and_home_made_layers_after_the_pool() -> None:
    class Scale(nn.Module):
        """Weights of its own, but neither a 1x1 conv nor an FC layer."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    normalised = nn.utils.parametrizations.weight_norm(nn.Conv2d(16, 10, 1))
    passing = BriefNet(head=nn.Sequential(nn.AdaptiveAvgPool2d(1), normalised, nn.Flatten()))
    failing = BriefNet(head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 10, 1),
                                          nn.Flatten(), Scale()))
    assert failed_rules(passing) == set()
    rows = {row.rule: row for row in check_brief(failing)}
    assert not rows["global average pooling, then 1x1 conv/FC"].passed
    assert rows["global average pooling, then 1x1 conv/FC"].measured == "head.0 -> 1x1, Scale"


def test_brief_check_reads_the_head_after_the_pool_run_that_was_global() -> None:
    class PoolTwice(nn.Module):
        """One 4x4 pool module run twice: on 32x32 (not global), then on 4x4 (global)."""

        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.pool = nn.AvgPool2d(4)
            self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
            self.head = nn.Conv2d(16, 10, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.c2(self.pool(self.c1(x)))
            return self.head(self.pool(x)).flatten(1)

    rows = {row.rule: row for row in check_brief(PoolTwice())}
    assert rows["global average pooling, then 1x1 conv/FC"].measured == "pool -> 1x1"
    assert rows["global average pooling, then 1x1 conv/FC"].passed


def test_brief_check_counts_frozen_weights_in_the_budget() -> None:
    frozen = nn.Conv2d(16, 16, 3, padding=8, dilation=8)
    big = nn.Conv2d(16, 4096, 1)  # 69,632 weights
    more = nn.Conv2d(4096, 16, 3, padding=1)  # 589,840
    net = BriefNet(c3=nn.Sequential(frozen, big, more)).requires_grad_(False)
    assert count_parameters(net) == 0
    assert "parameters < 200,000" in failed_rules(net)


def test_brief_check_needs_all_four_blocks_and_head() -> None:
    class NoBlocks(nn.Sequential):
        pass

    net = NoBlocks(BriefNet().c1, BriefNet().c2, BriefNet().c3, BriefNet().c4, BriefNet().head)
    assert "blocks C1 C2 C3 C4 + head" in failed_rules(net)


def test_model_summary_leaves_the_live_model_untouched() -> None:
    net = Net().train()
    before = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    model_summary(net)
    after = net.state_dict()
    assert any(name.endswith("num_batches_tracked") for name in after)
    assert all(torch.equal(before[name], after[name]) for name in before)  # BN statistics too
    assert net.training


def test_model_summary_is_the_torchsummary_table() -> None:
    text = model_summary(Net())
    assert f"Total params: {count_parameters(Net()):,}" in text
    assert "Conv2d" in text and "AdaptiveAvgPool2d" in text


def measured_field_of(features: nn.Module, side: int = 256) -> int:
    """Rows of input pixels whose gradient reaches the centre unit of `features`' output map.

    On a copy with every weight made positive and a positive input, every activation is
    positive, so no ReLU blocks a path: each pixel that can reach the unit does. In float64,
    so that gated blocks, which multiply activations, do not overflow to inf and NaN.
    """
    features = copy.deepcopy(features).double().eval()
    with torch.no_grad():
        for parameter in features.parameters():
            parameter.abs_()
    image = torch.rand(1, 3, side, side, dtype=torch.float64, requires_grad=True)
    output = features(image)
    centre = output.shape[-1] // 2
    output[0, :, centre, centre].sum().backward()
    rows = image.grad[0].abs().sum(dim=(0, 2)).nonzero().flatten()
    assert 0 < rows.min() and rows.max() < side - 1, "the field reaches the border: raise `side`"
    return int(rows.max() - rows.min() + 1)


def measured_receptive_field(net: nn.Module, side: int = 256) -> int:
    """`measured_field_of` the net's C1 to C4: the map its global pooling reads."""
    return measured_field_of(nn.Sequential(net.c1, net.c2, net.c3, net.c4), side)


@pytest.mark.parametrize("name", sorted(NETS))
def test_receptive_field_matches_the_pixels_that_reach_one_output(name: str) -> None:
    net = NETS[name]()
    assert receptive_field(net) == measured_receptive_field(net)
