"""Evaluation: train a student from scratch on a small image set and measure top-1 on the real test split;
the ``evaluation`` stage (a shard per set x regime x seed x student architecture,
``evaluation/{set}-{regime}-seed{S}[-studentK].json``; sets: ``distilled``, the random subsets ``random``,
``random-1``, ... and ``full``).

Three label regimes (Dey et al. 2026, "Hard truths about soft labels"):

- ``hard``: cross-entropy on the images' class labels;
- ``soft``: KL divergence to the stored soft labels (temperature T);
- ``soft_kd``: KL divergence to the teacher's output on every augmented view, computed online
  (the RDED / SRe2L evaluation).

With ``evaluation.loss: mse_gt`` the soft regimes use G-VBSM's loss instead of the KL: MSE between the
student's and the teacher's logits + gamma x cross-entropy on the class labels.

For stitched images (factor > 1) each sample shows one of its regions resized to the input size, with
that region's stored label (RDED Eq. 10), unless ``evaluation.region_views`` is off. Every batch is then
augmented by :class:`~ddpipe.augment.Augmenter` (crop, flip, CutMix; labels mixed by
area). A set's accuracy is taken at the final step; the same recipe and step count are used for the
distilled set and for the random subset it is compared with. The random-subset and full-set students are
reference students, shared by every run in the store that has the same inputs (:func:`baseline_key`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpipe import progress
from ddpipe.augment import Augmenter, crop_resize, generator, seed_for
from ddpipe.config import EvaluationConfig, RunConfig
from ddpipe.data import DataSource, normalize
from ddpipe.dataset import dataset_classes
from ddpipe.imageset import read_class, regions, run_sets, set_factor
from ddpipe.labels import label_rows
from ddpipe.manifests import stage_files
from ddpipe.models import ModelSpec, init_model
from ddpipe.pipeline import Context, Shard, Stage, shared_key, shared_outputs
from ddpipe.store import FileRecord
from ddpipe.teacher import label_model
from ddpipe.train import Fitter, accuracy, autocast, batch_to, maybe_compile, to_device

REGIMES = ("hard", "soft", "soft_kd")


@dataclass
class ImageSet:
    """A labelled image set held in memory: the distilled set or a random subset."""

    images: torch.Tensor  # uint8 [N, C, S, S]
    classes: torch.Tensor  # int64 [N]
    soft: torch.Tensor | None = None  # float32 [N, R, K] stored soft labels per region
    regions: list[tuple[int, int, int, int]] | None = None  # R region boxes (top, left, h, w)
    budget_images: int | None = None  # the set size that sets batch size and steps (full-set reference: the ipc set's)
    label_boxes: torch.Tensor | None = None  # [N, R, 4] box of each stored label (labels.crops or labels.keep < 1)
    label_present: torch.Tensor | None = None  # [N, R] which stored labels an image has (the rest pruned)
    label_crop: torch.Tensor | None = None  # [N, R] which stored labels are crops (labels.crops), not regions

    def __len__(self) -> int:
        return len(self.images)

    @property
    def budget(self) -> int:
        return self.budget_images or len(self.images)


def sample_regions(data: ImageSet, n: int, region_views: bool, gen: torch.Generator) -> torch.Tensor:
    """Which region each of ``n`` samples shows: 0 (the whole image) unless the images are stitched and
    ``region_views`` is on, then one grid cell (1..f^2) uniformly at random."""
    cells = len(data.regions) - 1 if data.regions else 0
    if cells <= 0 or not region_views:
        return torch.zeros(n, dtype=torch.int64)
    return torch.randint(1, cells + 1, (n,), generator=gen)


def sample_labels(data: ImageSet, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each sample, one of its image's stored labels (crops and regions, after pruning), uniformly."""
    return torch.multinomial(data.label_present[idx].float(), 1, generator=gen).squeeze(1)


def kl_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float,
            ev: EvaluationConfig) -> torch.Tensor:
    t = temperature
    loss = F.kl_div(F.log_softmax(student_logits / t, dim=1), target_probs, reduction="batchmean")
    return loss * (t * t) if ev.temperature_squared else loss


def centred(z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(dim=1, keepdim=True)


def mse_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """G-VBSM's logit MSE. The teacher's logits are recovered from its softened probabilities as T log p, which
    equals them up to a per-row shift; both sides are centred per row, so the shift does not matter."""
    target = temperature * torch.log(target_probs.clamp_min(1e-12))
    return F.mse_loss(centred(student_logits), centred(target))


def class_ce(logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """Cross-entropy on class labels, mixed by area when the batch was CutMix-ed."""
    loss = lam * F.cross_entropy(logits, y)
    if lam < 1.0:
        loss = loss + (1 - lam) * F.cross_entropy(logits, y[perm])
    return loss


def student_models(cfg: RunConfig) -> tuple[ModelSpec, ...]:
    """Every student architecture: ``evaluation.model`` (index 0), then ``evaluation.cross_models``."""
    return (cfg.evaluation.model, *cfg.evaluation.cross_models)


def train_student(cfg: RunConfig, regime: str, data: ImageSet, num_classes: int, seed: int, device,
                  teacher: nn.Module | None = None, progress: Callable[[int, int], None] | None = None,
                  student_index: int = 0) -> nn.Module:
    """Train a fresh student (architecture ``student_models(cfg)[student_index]``) on ``data`` under ``regime``;
    returns the model in eval mode."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}")
    if regime == "soft" and data.soft is None:
        raise ValueError("the soft regime needs stored soft labels")
    if regime == "soft_kd" and teacher is None:
        raise ValueError("the soft_kd regime needs the teacher")
    ev = cfg.evaluation
    mean, std = cfg.normalization
    spec = student_models(cfg)[student_index]
    stream = ("student", seed) if student_index == 0 else ("student", seed, f"model{student_index}")
    student = init_model(spec, cfg.channels, num_classes, cfg.image_size, seed_for(cfg.seed, *stream))
    student = to_device(student, device, cfg.runtime).train()
    net = maybe_compile(student, cfg.runtime)
    if teacher is not None:
        teacher = maybe_compile(teacher, cfg.runtime)
    gen = generator(cfg.seed, "student", regime, seed)
    aug = Augmenter(ev.augment, gen)
    n = len(data)
    bs = cfg.student_batch_size(data.budget)
    total = cfg.student_steps(data.budget)
    fitter = Fitter(student, ev.optim, total)
    ema = ema_model(student, ev.ema) if ev.ema > 0 else None
    size = data.images.shape[-1]
    region_boxes = torch.tensor(data.regions) if data.regions else None
    step = 0
    while step < total:
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, bs):
            if step >= total:
                break
            idx = order[s : s + bs]
            x = data.images[idx].float()
            stored_crop = None
            if regime == "soft" and data.label_present is not None:  # a stored label's crop, with that label
                r = sample_labels(data, idx, gen)
                x = crop_resize(x, data.label_boxes[idx, r], size)
                stored_crop = data.label_crop[idx, r]  # FKD: the stored crop is the sample's crop, not cropped again
            else:
                r = sample_regions(data, len(idx), ev.region_views, gen)
                if bool((r > 0).any()):  # show each sample's region at full size
                    x = crop_resize(x, region_boxes[r], size)
            target = data.soft[idx, r] if regime == "soft" else None
            x = batch_to(aug.views(normalize(x / 255.0, mean, std), keep=stored_crop), device, cfg.runtime)
            x, perm, lam = aug.mix(x)
            perm = perm.to(device)
            with autocast(device, cfg.runtime):
                logits = net(x).float()
                if regime == "soft_kd":
                    with torch.no_grad():
                        target = F.softmax(teacher(x).float() / cfg.labels.temperature, dim=1)
            y = data.classes[idx].to(device)
            if regime == "hard":
                loss = class_ce(logits, y, perm, lam)
            else:
                target = target.to(device)
                if regime == "soft" and lam < 1.0:
                    target = lam * target + (1 - lam) * target[perm]
                if ev.loss == "kl":
                    loss = kl_loss(logits, target, cfg.labels.temperature, ev)
                else:
                    loss = mse_loss(logits, target, cfg.labels.temperature) + ev.gt_weight * class_ce(logits, y, perm, lam)
            fitter.step(loss)
            if ema is not None:
                ema.update_parameters(student)
            step += 1
            if progress:
                progress(step, total)
    return (ema.module if ema is not None else student).eval()


def ema_model(student: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``student``'s parameters and buffers (``decay`` per update)."""
    return torch.optim.swa_utils.AveragedModel(
        student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)


def evaluate(cfg: RunConfig, regime: str, data: ImageSet, source: DataSource, seed: int, device,
             teacher: nn.Module | None = None, progress=None, student_index: int = 0, on: str = "test") -> dict:
    """Train one student and return its final top-1 on the test split, ``test_accuracy`` (plus its recipe). With
    ``on="val"``: on the validation split instead, ``val_accuracy`` (what a choice of settings may read)."""
    student = train_student(cfg, regime, data, source.num_classes, seed, device, teacher, progress, student_index)
    mean, std = cfg.normalization
    ev = cfg.evaluation
    split = {"test": source.test, "val": source.val}[on]
    if split is None:
        raise ValueError("no validation split (dataset.val_fraction is 0)")
    top1 = accuracy(student, split, mean, std, device, cfg.runtime, cfg.evaluation.test_batch_size)
    bs = cfg.student_batch_size(data.budget)
    return {
        "regime": regime,
        "seed": seed,
        "model": student_models(cfg)[student_index].model_dump(mode="json"),
        f"{on}_accuracy": round(top1, 6),
        "images": len(data),
        "batch_size": bs,
        "steps": cfg.student_steps(data.budget),
        f"{on}_images": len(split),
        **({"ema": ev.ema} if ev.ema else {}),
        **({"cosine_period": ev.optim.cosine_period} if ev.optim.cosine_period != 1 else {}),
    }


def summarize(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()) if len(arr) else None,
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "values": [float(v) for v in arr],
    }


# ---------------------------------------------------------------- the evaluation stage


def load_image_set(ctx: Context, set_name: str, num_classes: int, with_labels: bool) -> ImageSet:
    """A stored set (:mod:`ddpipe.imageset`) in memory, with its soft labels when ``with_labels``."""
    cfg = ctx.cfg
    images, classes, soft, boxes, present, region = [], [], [], [], [], []
    for c in range(num_classes):
        paths, imgs = read_class(ctx.store, set_name, c, cfg.channels)
        images.append(imgs)
        classes += [c] * len(imgs)
        if with_labels:
            for out, part in zip((soft, boxes, present, region),
                                 label_rows(ctx.store.read_table(f"{set_name}/labels/class={c:05d}.parquet"), paths)):
                out.append(part)
    varied = with_labels and (cfg.labels.crops > 0 or cfg.labels.keep < 1)  # labels per image, not per region
    boxes_of_regions = regions(cfg.image_size, set_factor(cfg.factor, set_name))
    return ImageSet(
        images=torch.cat(images), classes=torch.tensor(classes, dtype=torch.int64),
        soft=_padded(soft) if with_labels else None,
        regions=boxes_of_regions,
        label_boxes=_padded(boxes) if varied else None, label_present=_padded(present) if varied else None,
        label_crop=_padded(region) >= len(boxes_of_regions) if varied else None,  # numbered after the regions
    )


def _padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-class [n, R_c, ...] tensors joined along the images, padded with zeros to the largest R_c."""
    width = max(p.shape[1] for p in parts)
    out = []
    for p in parts:
        full = p.new_zeros((p.shape[0], width, *p.shape[2:]))
        full[:, : p.shape[1]] = p
        out.append(full)
    return torch.cat(out)


def full_set(ctx: Context, num_classes: int) -> ImageSet:
    """The whole training split as an image set, trained with the budget of the ipc sets."""
    split = ctx.source.train
    images = split.batch(np.arange(len(split)))
    return ImageSet(images=images, classes=torch.from_numpy(split.labels).long(),
                    regions=regions(ctx.cfg.image_size, 1), budget_images=ctx.cfg.method.ipc * num_classes)


# Evaluation fields that say which students a run trains, not how one is trained: a reference student's key
# leaves them out (its own regime, seed and draw are in the key), so a run with more seeds, regimes or random
# draws reuses the reference students it shares with an earlier one.
WHICH_STUDENTS = ("seeds", "regimes", "full", "baseline", "baseline_draws")


def baseline_key(ctx: Context, shard: Shard, inputs) -> str:
    """What a reference student (random subset, full set) depends on: the subset's images and labels and the
    teachers (online KD), the data, the student recipe and budget, the regime and seed, and the code; not how many
    other students the run trains (``WHICH_STUDENTS``)."""
    cfg = ctx.cfg
    files = []
    if shard.set != "full":  # a random subset: its own images and labels
        files += [f for f in stage_files(ctx.store, inputs["random_subset"]) if f.path.startswith(f"{shard.set}/")]
        files += [f for f in stage_files(ctx.store, inputs["labels"]) if f.path.startswith(f"{shard.set}/")]
        files += [f for f in stage_files(ctx.store, inputs["teacher"]) if f.path.endswith(".pt")]
    sections = json.loads(cfg.section_json("evaluation", "labels"))
    for field in WHICH_STUDENTS:
        sections["evaluation"].pop(field)
    payload = {
        "set": shard.set, "files": sorted((f.path, f.sha256) for f in files), "test": ctx.source.test.fingerprint,
        "train": ctx.source.train.fingerprint,
        "sections": sections, "ipc": cfg.method.ipc, "seed": cfg.seed,
        "regime": shard.regime, "student": shard.seed, "model": shard.student or 0,
    }
    return shared_key(payload, code=run_evaluation)


def run_evaluation(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Train one student on one set under one regime and seed; its final top-1 on the test split."""
    num_classes = len(dataset_classes(ctx.store, inputs["dataset"]))
    with_labels = shard.regime == "soft"
    if shard.set == "full":
        data = ctx.cached("set:full", lambda: full_set(ctx, num_classes))
    else:
        data = ctx.cached(
            f"set:{shard.set}:{with_labels}:{inputs['labels'].sha256}",
            lambda: load_image_set(ctx, shard.set, num_classes, with_labels),
        )

    def compute() -> dict[str, bytes]:
        result = evaluate(ctx.cfg, shard.regime, data, ctx.source, shard.seed, ctx.device,
                          label_model(ctx, inputs) if shard.regime == "soft_kd" else None,
                          progress.stepper("evaluation", shard.id, every=20), shard.student or 0)
        result["set"] = shard.set
        result["student"] = shard.student or 0
        return {"result.json": json.dumps(result, indent=1, sort_keys=True).encode()}

    rel = f"evaluation/{shard.id}.json"
    if shard.set != "distilled":  # the same reference student for every method run with the same inputs and recipe
        out = shared_outputs(ctx.cfg, "baselines", baseline_key(ctx, shard, inputs), compute)
    else:
        out = compute()
    return [ctx.store.write_bytes(rel, out["result.json"])]


def _eval_shards(ctx: Context, num_classes: int) -> list[Shard]:
    ev = ctx.cfg.evaluation
    return [
        Shard(id=f"{s}-{r}-seed{seed}" + (f"-student{k}" if k else ""), set=s, regime=r, seed=seed, student=k)
        for k in range(len(student_models(ctx.cfg))) for r in ev.regimes for seed in ev.seeds
        for s in run_sets(ctx.cfg) if s == "distilled" or ev.baseline
    ] + [Shard(id=f"full-hard-seed{seed}", set="full", regime="hard", seed=seed, student=0)
         for seed in ev.seeds if ev.full and "hard" in ev.regimes]


EVALUATION = Stage("evaluation", ("dataset", "teacher", "synthesis", "random_subset", "labels"),
                   ("dataset", "method", "labels", "evaluation"), _eval_shards, run_evaluation,
                   doc="train students under every regime and measure test accuracy")
