import pytest
import torch

from ddpipe.models import MODELS, ConvNet, ModelSpec, build_model, init_model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_registry_model_takes_any_channels_and_classes(name, channels):
    model = build_model(ModelSpec(name=name), channels, 7, 32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 32, 32))
    assert out.shape == (2, 7)


def test_convnet_follows_the_dc_layout_for_28px():
    net = ConvNet(1, 10, 28, width=128, depth=3, norm="instance")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].padding == (3, 3) and convs[1].padding == (1, 1)  # 28 -> 32 -> 16 -> 8 -> 4
    assert net.classifier.in_features == 128 * 4 * 4
    assert any(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 128 for m in net.modules())


@pytest.mark.parametrize("norm, kind", [("batch", torch.nn.BatchNorm2d), ("none", None)])
def test_convnet_norm_and_pooling_options(norm, kind):
    net = ConvNet(3, 5, 32, width=8, depth=2, norm=norm, pooling="max")
    norms = [m for m in net.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert (len(norms) == 2 and isinstance(norms[0], kind)) if kind else not norms
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())


def test_resnet18_small_has_3x3_stem_and_no_maxpool():
    model = build_model(ModelSpec(name="resnet18_small"), 1, 10, 28)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_init_model_depends_only_on_the_seed():
    spec = ModelSpec(width=8, depth=2)
    a, b = init_model(spec, 1, 10, 28, 5), init_model(spec, 1, 10, 28, 5)
    c = init_model(spec, 1, 10, 28, 6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def _conv_input_sides(model, size):
    sides = []
    hooks = [m.register_forward_pre_hook(lambda m, i: sides.append(i[0].shape[-1]))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.randn(2, 1, size, size))
    for h in hooks:
        h.remove()
    return sides


@pytest.mark.parametrize("small, large", [("mobilenet_v2_small", "mobilenet_v2"),
                                          ("shufflenet_v2_x0_5_small", "shufflenet_v2_x0_5")])
def test_small_image_variants_keep_28px_maps_above_1px(small, large):
    # the 224 px designs stride 32 down: at 28 px most of their convolutions see 1-2 px maps
    small_sides, large_sides = (_conv_input_sides(build_model(ModelSpec(name=n, width_mult=0.5), 1, 10, 28), 28)
                                for n in (small, large))
    assert len(small_sides) == len(large_sides)
    assert small_sides[0] == 28 and min(small_sides) == 4 and sorted(set(small_sides)) == [4, 7, 14, 28]
    assert min(large_sides) == 1


def test_mobilenet_v2_small_width_mult():
    narrow, full = (build_model(ModelSpec(name="mobilenet_v2_small", width_mult=w), 1, 10, 28) for w in (0.5, 1.0))
    assert narrow.features[0][0].out_channels == 16 and full.features[0][0].out_channels == 32
    assert narrow.features[0][0].stride == (1, 1)
