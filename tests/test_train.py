import pytest
import torch

from ddpipe.config import OptimConfig, RuntimeConfig
from ddpipe.models import ModelSpec, build_model
from ddpipe.train import build_optimizer, lr_factor, maybe_compile, resolve_device


def test_schedules():
    cos = lr_factor(OptimConfig(schedule="cosine", warmup_fraction=0.1), 100)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(99) < 0.01
    assert cos(55) == pytest.approx(0.5, abs=0.02)
    step = lr_factor(OptimConfig(schedule="step"), 100)
    assert step(50) == 1.0 and step(51) == 0.1  # x0.1 at half the run plus one, as the DC protocol
    assert lr_factor(OptimConfig(schedule="constant"), 10)(9) == 1.0


def test_no_weight_decay_on_norm_and_bias():
    model = build_model(ModelSpec(width=8, depth=2, norm="batch"), 1, 10, 28)
    opt = build_optimizer(model, OptimConfig(optimizer="adamw", weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


def test_device_choice_and_compile_switch():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    model = build_model(ModelSpec(width=8, depth=2), 1, 10, 28)
    assert maybe_compile(model, RuntimeConfig(compile=False)) is model
    compiled = maybe_compile(model, RuntimeConfig(compile=True))
    assert compiled is not model and compiled._orig_mod is model
