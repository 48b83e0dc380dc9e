"""The diffusion method on real Fashion-MNIST slices: denoiser training, resume, sampling, Frechet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpipe.config import DiffusionConfig, RuntimeConfig
from ddpipe.dataindex import open_source
from ddpipe.errors import ConfigError
from ddpipe.methods.diffusion.denoiser import (
    Space, UViT, build_denoiser, clean_estimate, ema_decay, noise_scheduler, noised, train_denoiser,
)
from ddpipe.methods.diffusion.generation import (
    generate_class, generation_plan, noise_level, sample, sampler, start_noise,
)
from ddpipe.methods.diffusion.pool import frechet_distance

from conftest import smoke_config

CPU, RT = torch.device("cpu"), RuntimeConfig()
TINY = dict(dim=32, depth=3, heads=2, patch_size=7, batch_size=32, warmup_steps=0, checkpoint_every=3)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return open_source(smoke_config(tmp_path_factory.mktemp("d"))).train


def _space(cfg: DiffusionConfig) -> Space:
    return Space(cfg, 28, 1, CPU)


@pytest.mark.fmnist
def test_training_loss_falls(split):
    cfg = DiffusionConfig(**{**TINY, "dim": 64, "patch_size": 4, "steps": 150, "lr": 1e-3, "checkpoint_every": 1000})
    state = train_denoiser(cfg, split, _space(cfg), 10, seed=0, device=CPU, runtime=RT)
    first, last = state["losses"][0], state["losses"][-1]
    assert state["step"] == 150 and len(state["losses"]) == 3
    assert last < 0.8 * first, f"mean loss of the first 50 steps {first:.3f}, of the last 50 {last:.3f}"


@pytest.mark.fmnist
def test_ema_weights_denoise_about_as_well_as_the_trained_weights(split):
    cfg = DiffusionConfig(**{**TINY, "dim": 64, "patch_size": 4, "steps": 150, "lr": 1e-3, "checkpoint_every": 1000})
    space = _space(cfg)
    state = train_denoiser(cfg, split, space, 10, seed=0, device=CPU, runtime=RT)
    x0 = space.encode(split.batch(np.arange(64)).float() / 255)
    y = torch.from_numpy(split.labels[:64])
    gen = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=gen), torch.randint(0, 1000, (64,), generator=gen)
    a = noise_scheduler(cfg).alphas_cumprod[t].view(-1, 1, 1, 1)
    errors = {}
    for which in ("model", "ema"):
        model = build_denoiser(cfg, space, 10).eval()
        model.load_state_dict(state[which])
        with torch.no_grad():
            errors[which] = float(((model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y) - noise) ** 2).mean())
    assert errors["ema"] < 1.25 * errors["model"], errors  # a 0.999 EMA without warm-up is still ~86 % init here
    assert ema_decay(0.999, 0) == 0.1 and ema_decay(0.999, 90) == 0.91 and ema_decay(0.999, 10**6) == 0.999


@pytest.mark.fmnist
def test_killed_training_resumes_from_last_checkpoint(split):
    cfg = DiffusionConfig(**{**TINY, "steps": 7})
    whole = train_denoiser(cfg, split, _space(cfg), 10, seed=3, device=CPU, runtime=RT)

    saved = []

    def save_then_die(state):
        saved.append(state)
        raise KeyboardInterrupt  # the process is killed right after its first checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_denoiser(cfg, split, _space(cfg), 10, seed=3, device=CPU, runtime=RT, save=save_then_die)
    checkpoint = saved[0]
    assert checkpoint["step"] == 3
    adam_steps = {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {3}

    seen = []
    resumed = train_denoiser(cfg, split, _space(cfg), 10, seed=3, device=CPU, runtime=RT, resume=checkpoint,
                             progress=lambda done, total: seen.append(done))
    assert seen[0] == 4 and seen[-1] == 7  # continues at step 4, does not redo steps 1-3
    assert {int(s["step"]) for s in resumed["optimizer"]["state"].values()} == {7}
    for k in whole["ema"]:
        assert torch.equal(whole["ema"][k], resumed["ema"][k]), k
        assert torch.equal(whole["model"][k], resumed["model"][k]), k


def test_sampling_is_deterministic_and_runs_the_configured_steps():
    cfg = DiffusionConfig(**{**TINY, "sampler_steps": 7, "guidance": 1.0})
    model = build_denoiser(cfg, _space(cfg), 10).eval()
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    a = generate_class(model, cfg, _space(cfg), c=3, start=0, count=4, seed=1, device=CPU, runtime=RT)
    assert len(calls) == 7
    b = generate_class(model, cfg, _space(cfg), c=3, start=0, count=4, seed=1, device=CPU, runtime=RT)
    assert torch.equal(a, b) and a.shape == (4, 1, 28, 28) and a.min() >= 0 and a.max() <= 1
    # image j's noise depends on (seed, class, j) only, so a later batch starts image 2 and 3 where this one did
    # (the images agree up to float rounding, which depends on the batch size)
    assert torch.equal(start_noise(_space(cfg), 1, 3, range(4))[2:], start_noise(_space(cfg), 1, 3, [2, 3]))
    c = generate_class(model, cfg, _space(cfg), c=3, start=2, count=2, seed=1, device=CPU, runtime=RT)
    assert (a[2:] - c).abs().max() < 1e-4
    other = generate_class(model, cfg, _space(cfg), c=3, start=0, count=4, seed=2, device=CPU, runtime=RT)
    assert not torch.equal(a, other)

    calls.clear()
    guided = cfg.model_copy(update={"guidance": 3.0})
    sample(model, guided, _space(guided), torch.tensor([1, 2]), torch.randn(2, 1, 28, 28), CPU, RT)
    assert calls == [4] * 7  # one batched call per step: conditional and unconditional halves


def test_guidance_interval_guides_only_the_steps_whose_noise_level_lies_in_it():
    cfg = DiffusionConfig(**{**TINY, "sampler_steps": 10, "guidance": 3.0})
    space, model = _space(cfg), build_denoiser(cfg, _space(cfg), 10).eval()
    alphas = noise_scheduler(cfg).alphas_cumprod
    sigma = noise_level(alphas)
    assert sigma[0] < 0.02 and sigma[-1] > 100 and bool((sigma[1:] > sigma[:-1]).all())  # linear betas, 1,000 steps
    assert noise_level(torch.tensor(0.5)).item() == pytest.approx(1.0)  # as much noise as signal
    classes, noise = torch.tensor([1, 2]), torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))

    def run(**update):
        calls.clear()
        return sample(model, cfg.model_copy(update=update), space, classes, noise, CPU, RT), list(calls)

    always, calls_always = run()
    assert calls_always == [4] * 10
    unguided, calls_unguided = run(guidance=1.0)
    assert calls_unguided == [2] * 10
    # an interval holding every step's noise level is plain guidance; one holding none is no guidance
    assert torch.equal(run(guidance_interval=(0.0, 1e4))[0], always)
    assert torch.equal(run(guidance_interval=(1e3, 1e4))[0], unguided)
    # the middle: guided steps are those whose sigma lies in [0.5, 5]; sampling runs from high noise to low
    middle, calls_middle = run(guidance_interval=(0.5, 5.0))
    solver = sampler(cfg)
    solver.set_timesteps(10)
    inside = [0.5 <= float(noise_level(alphas[int(t)])) <= 5.0 for t in solver.timesteps]
    assert calls_middle == [4 if i else 2 for i in inside] and 0 < sum(inside) < 10
    first = inside.index(True)  # one block of guided steps, after the high-noise steps the sampler starts with
    assert first > 0 and inside == [False] * first + [True] * sum(inside) + [False] * (10 - first - sum(inside))
    assert not torch.equal(middle, always) and not torch.equal(middle, unguided)
    with pytest.raises(ValueError, match="guidance_interval"):
        DiffusionConfig(guidance_interval=(2.0, 1.0))


class _Oracle(torch.nn.Module):
    """A denoiser that knows the clean images ``x0``: it outputs the exact noise, v or x0 the training targets
    of :func:`noised` would give for any ``x_t``, at the timestep the sampler passes."""

    num_classes = 10

    def __init__(self, x0: torch.Tensor, cfg: DiffusionConfig):
        super().__init__()
        self.x0, self.prediction, self.alphas = x0, cfg.prediction, noise_scheduler(cfg).alphas_cumprod

    def forward(self, x, t, y):
        a = self.alphas[t.long()].view(-1, 1, 1, 1).expand(len(x), 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return noised(self.x0, eps, a, self.prediction)[1]


@pytest.mark.fmnist
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_sampler_follows_the_training_parameterisation(split, prediction):
    """The sampler reads the model's output as the training target (same prediction type, same timesteps and
    schedule): fed by an oracle of real images, it lands on those images from pure noise."""
    cfg = DiffusionConfig(**{**TINY, "prediction": prediction, "sampler_steps": 20, "guidance": 1.0})
    images = split.batch(np.arange(4)).float() / 255
    space = _space(cfg)
    oracle, classes = _Oracle(space.encode(images), cfg), torch.zeros(4, dtype=torch.int64)
    noise = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = sample(oracle, cfg, space, classes, noise, CPU, RT)
    assert (out - images).abs().max() < 0.02, float((out - images).abs().max())
    x0, eps, a = torch.rand(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor(0.3).view(1, 1, 1, 1)
    xt, target = noised(x0, eps, a, prediction)
    assert torch.allclose(xt, 0.3**0.5 * x0 + 0.7**0.5 * eps)
    assert torch.allclose(clean_estimate(target, xt, a, prediction), x0, atol=1e-5)
    # what the oracle would be with a wrong type must fail: the check above can tell the types apart
    wrong = cfg.model_copy(update={"prediction": "sample" if prediction != "sample" else "epsilon"})
    bad = sample(oracle, wrong, space, classes, noise, CPU, RT)
    assert (bad - images).abs().max() > 0.1


def test_uvit_shapes_and_bad_geometry():
    model = UViT(28, 1, 10, patch_size=4, dim=32, depth=5, heads=4)
    x = torch.randn(3, 1, 28, 28)
    assert model(x, torch.tensor([1, 500, 999]), torch.tensor([0, 9, 10])).shape == x.shape
    assert len(model.in_blocks) == 2 and len(model.out_blocks) == 2
    with pytest.raises(ConfigError, match="patch_size"):
        UViT(28, 1, 10, patch_size=5)
    with pytest.raises(ConfigError, match="depth"):
        UViT(28, 1, 10, depth=4)


def test_latent_space_round_trip(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4).save_pretrained(tmp_path / "vae")
    cfg = DiffusionConfig(**{**TINY, "space": "latent", "autoencoder": str(tmp_path / "vae"), "patch_size": 2,
                             "sampler_steps": 2})
    space = _space(cfg)
    assert (space.size, space.channels) == (14, 4)
    z = space.encode(torch.rand(2, 1, 28, 28))
    assert z.shape == (2, 4, 14, 14)
    model = build_denoiser(cfg, space, 10).eval()
    images = generate_class(model, cfg, space, c=0, start=0, count=2, seed=0, device=CPU, runtime=RT)
    assert images.shape == (2, 1, 28, 28)
    with pytest.raises(Exception, match="autoencoder"):
        Space(cfg.model_copy(update={"autoencoder": str(tmp_path / "missing")}), 28, 1, CPU)


def test_generation_plan_count_and_budget():
    cfg = DiffusionConfig(images_per_class=5, sample_batch_size=2)
    plan = list(generation_plan(cfg, (0, 1), 2))
    assert plan == [(0, 0, 2), (1, 0, 2), (0, 2, 2), (1, 2, 2), (0, 4, 1), (1, 4, 1)]
    ticks = iter(range(100))
    budget = cfg.model_copy(update={"time_budget_s": 2.0})  # this shard's share: 2 s x 2/4 classes = 1 s
    plan = list(generation_plan(budget, (0, 1), 4, clock=lambda: next(ticks)))
    assert plan == [(0, 0, 2), (1, 0, 2)]  # one round, then the clock says the budget is spent


@pytest.mark.fmnist
def test_frechet_distance(split):
    feats = split.batch(np.arange(400)).float().flatten(1)[:, ::16].numpy() / 255
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    shifts = [frechet_distance(feats, feats + s) for s in (0.1, 0.2, 0.4)]
    d = feats.shape[1]
    assert shifts == pytest.approx([d * 0.01, d * 0.04, d * 0.16], rel=1e-6)  # a pure shift adds |mu|^2
    other = split.batch(np.arange(400, 800)).float().flatten(1)[:, ::16].numpy() / 255
    assert 0 < frechet_distance(feats, other) < frechet_distance(feats, other * 0.5)
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(feats, feats[:, :3])


def test_every_diffusion_field_is_classified_for_the_denoiser_key():
    """A field that changes the trained weights must be in the denoiser's cache key (TRAINING_FIELDS), or a run
    with another value would silently reuse a denoiser trained without it. Likewise a field that changes the
    generated images must be in the shared pool's key (SAMPLING_FIELDS); the rest only steer selection, quality
    or checkpoint frequency."""
    from ddpipe.methods.diffusion.generation import SAMPLING_FIELDS
    from ddpipe.methods.diffusion.training import TRAINING_FIELDS

    after_sampling = {"checkpoint_every", "select", "reference_images"}
    training, sampling = set(TRAINING_FIELDS), set(SAMPLING_FIELDS)
    assert set(DiffusionConfig.model_fields) == training | sampling | after_sampling
    assert not training & sampling and not (training | sampling) & after_sampling
