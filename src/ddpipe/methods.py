"""Distillation methods: each contributes the stages that make the distilled set.

A run is ``DATASET, TEACHER, <method stages>, RANDOM_SUBSET, LABELS, EVALUATION``; the method's last stage
is named ``synthesis`` and writes ``distilled/provenance/class=C.parquet`` (:data:`ddpipe.stages.PROVENANCE_SCHEMA`)
naming the images under ``distilled/images/``. Adding a method means adding its stages here.

=============  =====================  ======================================================================
method         stages                 outputs (relative to the run folder)
=============  =====================  ======================================================================
rded           scoring                ``scoring/class=CCCCC.parquet`` (:data:`ddpipe.rded.SCORES_SCHEMA`)
               synthesis              ``distilled/images/...png``, ``distilled/provenance/class=CCCCC.parquet``
sre2l, cda     statistics             ``statistics/teacher0.pt`` (BN running statistics)
               recovery               ``distilled/images/...png``, ``recovery/<shard>.parquet`` (provenance),
                                      ``recovery/<shard>.json`` (losses at the first and last step)
               synthesis              ``distilled/provenance/class=CCCCC.parquet`` (joined from recovery)
gvbsm          moments                ``statistics/moments/<shard>.pt`` (per teacher and image range;
                                      shared across runs in ``<store>/shared/moments``)
               statistics             ``statistics/teacherK.pt`` (conv channel/patch and BN statistics)
               recovery, synthesis    as sre2l
=============  =====================  ======================================================================
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ddpipe import progress
from ddpipe.augment import generator, seed_for
from ddpipe.config import RunConfig
from ddpipe.coreset import cad_scores, forgetting_events, herding, k_center_greedy, top_k
from ddpipe.data import ArraySplit, normalize
from ddpipe.diffusion import Space, build_denoiser, loss_log, read_state, state_bytes, train_denoiser
from ddpipe.dynamics import dynamics_table, read_dynamics, record_dynamics
from ddpipe.errors import DataError
from ddpipe.evaluate import student_batch_size, student_steps
from ddpipe.generation import frechet_distance, generate_class, generation_plan
from ddpipe.manifests import stage_files
from ddpipe.models import init_model
from ddpipe.pipeline import Context, Shard, Stage, code_hash, grown, shared_key, shared_outputs
from ddpipe.rded import score_class, selected_rows, stitch_class
from ddpipe.recovery import recover
from ddpipe.stages import (
    DATASET, EVALUATION, LABELS, RANDOM_SUBSET, TEACHER, class_groups, image_grid, image_path, load_class_images,
    png_bytes, provenance_table, random_picks, single_shard, synthetic_row, teacher_files, teacher_of,
    write_image_set_class, write_real_images,
)
from ddpipe.statistics import collect, global_statistics, merge, moments_bytes, read_moments, read_statistics, statistics_bytes
from ddpipe.store import FileRecord, Store, table_bytes
from ddpipe.train import penultimate_features, predict_logits, to_device

# ---------------------------------------------------------------- RDED


def run_scoring(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """RDED stage 1 for a class group: ``scoring/class=C.parquet`` per class."""
    teacher = teacher_of(ctx, inputs)
    files = []
    for k, c in enumerate(shard.classes):
        pool = cad_pool(ctx, c, inputs) if "dynamics" in inputs else None  # ca2d
        table = score_class(teacher, ctx.source.train, c, ctx.cfg, generator(ctx.cfg.seed, "scoring", c), ctx.device,
                            candidates=pool)
        files.append(ctx.store.write_table(f"scoring/class={c:05d}.parquet", table))
        progress.emit("step", "scoring", shard.id, k + 1, len(shard.classes))
    return files


def run_synthesis(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """RDED stage 2 for a class group: the stitched images and their provenance."""
    files = []
    for c in shard.classes:
        rows = selected_rows(ctx.store.read_table(f"scoring/class={c:05d}.parquet"), ctx.cfg)
        images, provenance = stitch_class(ctx.source.train, rows, ctx.cfg)
        files += write_image_set_class(ctx.store, "distilled", c, images, provenance)
    return files


RDED = (
    Stage("scoring", ("dataset", "teacher"), ("dataset", "method"), class_groups, run_scoring,
          doc="RDED stage 1: score crops, select the top factor^2 x ipc per class"),
    Stage("synthesis", ("dataset", "scoring"), ("dataset", "method"), class_groups, run_synthesis,
          doc="RDED stage 2: stitch the selected patches into images"),
)

# ---------------------------------------------------------------- recovery: SRe2L, CDA, G-VBSM


def statistic_teachers(cfg: RunConfig) -> range:
    """The teachers a recovery method matches: all of them for gvbsm, the primary otherwise."""
    return range(len(cfg.teacher_models) if cfg.method.name == "gvbsm" else 1)


def _moment_shards(ctx: Context, num_classes: int) -> list[Shard]:
    n = len(ctx.source.train)
    step = grown(ctx.cfg.statistics.images_per_shard, n, ctx.cfg.orchestration.max_shards_per_stage)
    return [
        Shard(id=f"teacher{k}-images-{a:09d}-{min(a + step, n) - 1:09d}", teacher=k, images=(a, min(a + step, n)))
        for k in statistic_teachers(ctx.cfg) for a in range(0, n, step)
    ]


def _teacher_sha(ctx: Context, inputs, k: int) -> str:
    path = teacher_files(k)[0]
    return next(f.sha256 for f in stage_files(ctx.store, inputs["teacher"]) if f.path == path)


def run_moments(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Moments at every conv input of teacher ``shard.teacher`` over a range of training images."""
    cfg = ctx.cfg
    st = cfg.statistics
    teacher = teacher_of(ctx, inputs, shard.teacher)
    a, b = shard.images
    key = shared_key({
        "teacher": _teacher_sha(ctx, inputs, shard.teacher), "data": ctx.source.train.fingerprint, "images": [a, b],
        "patch_size": st.patch_size, "batch_size": st.batch_size, "code": code_hash("statistics", "data"),
    })

    def compute() -> dict[str, bytes]:
        mean, std = cfg.normalization
        moments = collect(teacher.model, ctx.source.train, np.arange(a, b), st.patch_size, st.batch_size, mean, std,
                          ctx.device, cfg.runtime, progress.stepper("moments", shard.id, every=st.batch_size))
        return {"moments.pt": moments_bytes(moments)}

    data = shared_outputs(cfg, "moments", key, compute)["moments.pt"]
    return [ctx.store.write_bytes(f"statistics/moments/{shard.id}.pt", data)]


def _statistic_shards(ctx: Context, num_classes: int) -> list[Shard]:
    return [Shard(id=f"teacher{k}", teacher=k) for k in statistic_teachers(ctx.cfg)]


def run_statistics(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Teacher ``shard.teacher``'s global statistics: its BN running statistics, and for gvbsm the conv-input
    statistics merged exactly from the moments shards."""
    k = shard.teacher
    teacher = teacher_of(ctx, inputs, k)
    moments = {}
    if "moments" in inputs:
        parts = [s for s in _moment_shards(ctx, 0) if s.teacher == k]
        moments = merge([read_moments(ctx.store.read_bytes(f"statistics/moments/{s.id}.pt")) for s in parts])
    stats = global_statistics(teacher.model, moments, ctx.cfg.statistics.patch_size)
    return [ctx.store.write_bytes(f"statistics/teacher{k}.pt", statistics_bytes(stats))]


def _range_id(c0: int, c1: int, j0: int, j1: int) -> str:
    """Name of classes [c0, c1) x ipc indices [j0, j1): a recovery shard's id, and a unit's random-stream id."""
    return f"classes-{c0:05d}-{c1 - 1:05d}-ipc-{j0:05d}-{j1 - 1:05d}"


def recovery_units(cfg: RunConfig, classes: tuple[int, ...], ipc: tuple[int, int]) -> list[tuple[str, tuple[int, ...]]]:
    """The recovery units (``method.recovery.classes_per_batch`` classes x one ``ipc_per_shard`` range) among
    ``classes`` (which start at a multiple of classes_per_batch): (unit id, its classes). A unit's random draws
    depend on its id only, so grouping units into shards never changes the images."""
    size, (j0, j1) = cfg.method.recovery.classes_per_batch, ipc
    return [(_range_id(c0, min(c0 + size, classes[-1] + 1), j0, j1), tuple(c for c in classes if c0 <= c < c0 + size))
            for c0 in range(classes[0], classes[-1] + 1, size)]


def _recovery_shards(ctx: Context, num_classes: int) -> list[Shard]:
    """One shard per recovery unit; with more units than ``orchestration.max_shards_per_stage``, consecutive
    class batches of one ipc range are grouped into a shard."""
    cfg = ctx.cfg
    rc, ipc = cfg.method.recovery, cfg.method.ipc
    ranges = [(j0, min(j0 + rc.ipc_per_shard, ipc)) for j0 in range(0, ipc, rc.ipc_per_shard)]
    batches = -(-num_classes // rc.classes_per_batch)
    per_shard = grown(1, batches * len(ranges), cfg.orchestration.max_shards_per_stage)
    step = rc.classes_per_batch * per_shard
    out = []
    for j0, j1 in ranges:
        for c0 in range(0, num_classes, step):
            c1 = min(c0 + step, num_classes)
            out.append(Shard(id=_range_id(c0, c1, j0, j1), classes=tuple(range(c0, c1)), ipc=(j0, j1)))
    return out


def recovery_batches(cfg: RunConfig, classes: tuple[int, ...], ipc: tuple[int, int]) -> list[list[tuple[int, int]]]:
    """The (class, ipc index) pairs of one recovery unit optimised together: sre2l/cda one batch of distinct
    classes per ipc index; gvbsm one class-major batch of the whole unit."""
    j0, j1 = ipc
    if cfg.method.name == "gvbsm":
        return [[(c, j) for c in classes for j in range(j0, j1)]]
    return [[(c, j) for c in classes] for j in range(j0, j1)]


def run_recovery(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Recover the shard's images from noise; each image's starting noise depends only on (seed, class, ipc index)."""
    cfg, store = ctx.cfg, ctx.store
    size, channels = cfg.image_size, cfg.channels
    pairs = []
    for k in statistic_teachers(cfg):
        stats = ctx.cached(f"statistics:{inputs['statistics'].sha256}:{k}",
                           lambda k=k: read_statistics(store.read_bytes(f"statistics/teacher{k}.pt")))
        pairs.append((teacher_of(ctx, inputs, k).model, stats))
    files, rows, losses = [], [], []
    batches = []
    for unit, classes in recovery_units(cfg, shard.classes, shard.ipc):
        gen = generator(cfg.seed, "recovery", unit)  # one stream per unit, whichever shard holds it
        batches += [(gen, batch) for batch in recovery_batches(cfg, classes, shard.ipc)]
    for b, (gen, batch) in enumerate(batches):
        init = torch.stack([torch.randn(channels, size, size, generator=generator(cfg.seed, "recovery-init", c, j))
                            for c, j in batch])
        classes = torch.tensor([c for c, _ in batch], dtype=torch.int64)
        step = progress.stepper("recovery", shard.id, every=20)
        images, info = recover(cfg, pairs, classes, init, ctx.device, gen,
                               lambda done, total: step(b * total + done, len(batches) * total))
        for (c, j), img in zip(batch, images):
            files.append(store.write_bytes(image_path("distilled", c, j), png_bytes(img)))
            rows.append(synthetic_row(c, j, size))
        losses.append({"classes": sorted({c for c, _ in batch}), "ipc": sorted({j for _, j in batch}),
                       **{f"{name}_first": v[0] for name, v in info.items()},
                       **{f"{name}_last": v[-1] for name, v in info.items()}})
    files.append(store.write_table(f"recovery/{shard.id}.parquet", provenance_table("distilled", rows)))
    files.append(store.write_bytes(f"recovery/{shard.id}.json", json.dumps(losses, indent=1, sort_keys=True).encode()))
    return files


def run_assembly(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """The distilled set's per-class provenance, joined from the recovery shards."""
    parts = ctx.cached(
        f"recovery-rows:{inputs['recovery'].sha256}",
        lambda: pa.concat_tables([ctx.store.read_table(f"recovery/{s.id}.parquet")
                                  for s in _recovery_shards(ctx, len(ctx.source.classes))]),
    )
    files = []
    for c in shard.classes:
        rows = parts.filter(pc.equal(parts["class_index"], c)).sort_by("ipc_index")
        files.append(ctx.store.write_table(f"distilled/provenance/class={c:05d}.parquet", rows))
    return files


_RECOVERY = Stage("recovery", ("dataset", "teacher", "statistics"), ("dataset", "method", "statistics"), _recovery_shards,
                  run_recovery, doc="recover images from noise against the teachers' statistics")
_ASSEMBLY = Stage("synthesis", ("dataset", "recovery"), ("dataset", "method"), class_groups, run_assembly,
                  doc="join the recovered images' provenance per class")
_BN_STATISTICS = Stage("statistics", ("dataset", "teacher"), ("dataset", "method", "statistics"), _statistic_shards,
                       run_statistics, doc="the teacher's BatchNorm running statistics")
_MOMENTS = Stage("moments", ("dataset", "teacher"), ("dataset", "statistics"), _moment_shards, run_moments,
                 doc="one no-grad pass per teacher over the training images: moments at every conv input")
_STATISTICS = Stage("statistics", ("dataset", "teacher", "moments"), ("dataset", "method", "statistics"),
                    _statistic_shards, run_statistics, doc="merge the moments exactly; add BN running statistics")

# ---------------------------------------------------------------- coreset selections and CA2D


def dynamics_steps(cfg: RunConfig, num_classes: int) -> int:
    """Training steps of each dynamics proxy. ``matched``: the samples the downstream students see (their steps x
    batch size) in proxy batches, never fewer than the checkpoints."""
    sel = cfg.method.selection
    if sel.steps != "matched":
        return max(sel.steps, sel.checkpoints)
    n = cfg.method.ipc * num_classes
    seen = student_steps(cfg, n) * student_batch_size(cfg, n)
    return max(sel.checkpoints, -(-seen // sel.batch_size))


def _dynamics_shards(ctx: Context, num_classes: int) -> list[Shard]:
    return [Shard(id=f"seed{s}", seed=s) for s in range(ctx.cfg.method.selection.seeds)]


def run_dynamics(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Train proxy ``shard.seed`` on the full training split and record every sample at each checkpoint.
    Shared across runs in ``<store>/shared/dynamics`` (el2n, forgetting, cad and ca2d at one ipc use the same)."""
    cfg, split = ctx.cfg, ctx.source.train
    sel, t = cfg.method.selection, cfg.teacher
    spec = sel.proxy or t.model
    steps = dynamics_steps(cfg, ctx.source.num_classes)
    recipe = {k: v for k, v in json.loads(cfg.section_json("teacher"))["teacher"].items()
              if k in ("optim", "augment", "label_smoothing")}
    key = shared_key({
        "data": split.fingerprint, "recipe": recipe, "proxy": spec.model_dump(mode="json"), "steps": steps,
        "checkpoints": sel.checkpoints, "batch_size": sel.batch_size, "seed": [cfg.seed, shard.seed],
        "code": code_hash("augment", "coreset", "data", "dynamics", "models", "train"),
    })

    def compute() -> dict[str, bytes]:
        mean, std = cfg.normalization
        model = init_model(spec, cfg.channels, ctx.source.num_classes, cfg.image_size,
                           seed_for(cfg.seed, "dynamics", shard.seed, "init"))
        model = to_device(model, ctx.device, cfg.runtime)
        d = record_dynamics(
            model, split, np.arange(len(split)), steps=steps, checkpoints=sel.checkpoints, batch_size=sel.batch_size,
            optim=t.optim, augment=t.augment, label_smoothing=t.label_smoothing,
            gen=generator(cfg.seed, "dynamics", shard.seed, "data"), mean=mean, std=std, device=ctx.device,
            runtime=cfg.runtime, progress=progress.stepper("dynamics", shard.id, every=10),
        )
        return {"dynamics.parquet": table_bytes(dynamics_table(d, split.labels))}

    data = shared_outputs(cfg, "dynamics", key, compute)["dynamics.parquet"]
    return [ctx.store.write_bytes(f"dynamics/{shard.id}.parquet", data, rows=len(split))]


def dynamics_scores(ctx: Context, inputs) -> np.ndarray:
    """The method's score of every training sample (by split position), averaged over the proxy seeds:
    el2n at ``selection.el2n_checkpoint``, forgetting events between consecutive checkpoints, or CAD
    (cad, ca2d)."""
    def compute():
        sel, name = ctx.cfg.method.selection, ctx.cfg.method.name
        total = np.zeros(len(ctx.source.train))
        for s in _dynamics_shards(ctx, 0):
            d = read_dynamics(ctx.store.read_table(f"dynamics/{s.id}.parquet"))
            if name == "el2n":
                score = d.el2n[sel.el2n_checkpoint - 1]
            elif name == "forgetting":
                score = forgetting_events(d.correct)
            else:
                score = cad_scores(d.el2n, sel.window, sel.last)
            total[d.indices] += score
        return total / sel.seeds

    return ctx.cached(f"dynamics-scores:{inputs['dynamics'].sha256}", compute)


def select_class(ctx: Context, c: int, inputs) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``ipc`` training images of class ``c`` the selection keeps (split positions, in order) and their
    scores (none for random)."""
    cfg, split = ctx.cfg, ctx.source.train
    name, ipc = cfg.method.name, cfg.method.ipc
    pool = split.class_indices(c)
    if len(pool) < ipc:
        raise DataError(f"class {c} has {len(pool)} training images, fewer than method.ipc={ipc}")
    if name == "random":
        return random_picks(cfg, split, c), None
    if name in ("herding", "kcenter"):
        mean, std = cfg.normalization
        feats = penultimate_features(teacher_of(ctx, inputs).model, split, pool, mean, std, ctx.device, cfg.runtime)
        order = herding(feats, ipc) if name == "herding" else k_center_greedy(feats, ipc)
        return pool[order], None
    return kept_by_dynamics(ctx, pool, ipc, inputs)


def kept_by_dynamics(ctx: Context, pool: np.ndarray, n: int, inputs) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` images of ``pool`` at the ``selection.keep`` end of the dynamics score, and their scores."""
    scores = dynamics_scores(ctx, inputs)[pool]
    order = top_k(scores, n, largest=ctx.cfg.method.selection.keep == "largest")
    return pool[order], scores[order]


def run_selection(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """A coreset selection for a class group: the kept real images, stored as the distilled set."""
    files = []
    for k, c in enumerate(shard.classes):
        picks, scores = select_class(ctx, c, inputs)
        files += write_real_images(ctx, "distilled", c, picks, scores)
        progress.emit("step", "synthesis", shard.id, k + 1, len(shard.classes))
    return files


def cad_pool(ctx: Context, c: int, inputs) -> np.ndarray:
    """CA2D's candidate pool of class ``c``: its ``candidates_per_class`` training images with the highest CAD
    (the lowest with ``selection.keep: smallest``)."""
    pool = ctx.source.train.class_indices(c)
    return kept_by_dynamics(ctx, pool, min(len(pool), ctx.cfg.method.candidates_per_class), inputs)[0]


# ---------------------------------------------------------------- diffusion


def diffusion_key(ctx: Context) -> str:
    """What a trained denoiser depends on: data, the training fields of ``method.diffusion``, seed, code."""
    return shared_key(_diffusion_payload(ctx))


def trajectory_key(ctx: Context) -> str:
    """The denoiser key without ``steps``: runs that differ only in their length follow one training
    trajectory (no step depends on the total), so they share its saved states."""
    payload = _diffusion_payload(ctx)
    del payload["diffusion"]["steps"]
    return shared_key(payload)


def _diffusion_payload(ctx: Context) -> dict:
    cfg = ctx.cfg
    recipe = cfg.method.diffusion.model_dump(mode="json", include=set(TRAINING_FIELDS))
    return {"data": ctx.source.train.fingerprint, "dataset": json.loads(cfg.section_json("dataset")),
            "diffusion": recipe, "seed": cfg.seed, "code": code_hash("augment", "data", "diffusion")}


TRAINING_FIELDS = ("space", "autoencoder", "patch_size", "dim", "depth", "heads", "mlp_ratio", "timesteps",
                   "beta_schedule", "prediction", "steps", "batch_size", "lr", "weight_decay", "momentum",
                   "warmup_steps", "ema_decay", "class_dropout")


def diffusion_space(ctx: Context) -> Space:
    return ctx.cached("diffusion-space", lambda: Space(ctx.cfg.method.diffusion, ctx.cfg.image_size, ctx.cfg.channels,
                                                      ctx.device))


def run_diffusion(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Train the denoiser (shared across runs in ``<store>/shared/diffusion/<key>``).

    Training states go to ``<store>/shared/diffusion-states/<trajectory key>/step-<step>.pt``: every
    ``checkpoint_every`` steps (replacing the previous checkpoint) and at the end (kept). Training starts from the
    latest state at or below ``steps``: the last checkpoint of a run that stopped, or the final state of a shorter
    run of the same recipe, so 12,000 steps after a 7,000-step run train 5,000 more."""
    cfg, dc = ctx.cfg, ctx.cfg.method.diffusion
    store = Store(cfg.store.uri, cfg.store.storage_options)
    states = store.child(f"shared/diffusion-states/{trajectory_key(ctx)}")

    def train() -> dict[str, bytes]:
        start = latest_state(states.list(""), dc.steps)
        resume = read_state(states.read_bytes(start), states.url(start)) if start else None
        written = [start] if resume and not resume.get("final") else []  # a stopped run's checkpoint is replaced

        def save(state: dict) -> None:
            final = state["step"] == dc.steps
            name = state_name(state["step"])
            states.write_bytes(name, state_bytes({**state, "final": final}))
            for old in written:
                if old != name:
                    states.remove(old)
            written[:] = [] if final else [name]

        t0 = time.perf_counter()
        state = train_denoiser(dc, ctx.source.train, diffusion_space(ctx), ctx.source.num_classes, cfg.seed,
                               ctx.device, cfg.runtime, resume=resume, save=save,
                               progress=progress.stepper("diffusion", shard.id, every=10))
        info = {"steps": state["step"], "resumed_from_step": resume["step"] if resume else 0,
                "loss_every_50_steps": [round(v, 6) for v in loss_log(state)],
                "seconds": round(time.perf_counter() - t0, 3),
                "parameters": sum(v.numel() for v in state["ema"].values())}
        return {"denoiser.pt": state_bytes({"ema": state["ema"], "classes": ctx.source.classes}),
                "training.json": json.dumps(info, indent=1).encode()}

    out = shared_outputs(cfg, "diffusion", diffusion_key(ctx), train)
    return [ctx.store.write_bytes(f"diffusion/{name}", data) for name, data in sorted(out.items())]


def state_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def latest_state(names: list[str], steps: int) -> str | None:
    """The saved training state with the most steps at or below ``steps`` among file ``names``."""
    found = [n for n in names if (m := re.fullmatch(r"step-(\d{8})\.pt", n)) and int(m[1]) <= steps]
    return max(found, default=None)


def denoiser_of(ctx: Context, inputs) -> torch.nn.Module:
    """The trained denoiser's EMA weights, on the run's device, memoised per context."""
    def load():
        state = read_state(ctx.store.read_bytes("diffusion/denoiser.pt"), ctx.store.url("diffusion/denoiser.pt"))
        model = build_denoiser(ctx.cfg.method.diffusion, diffusion_space(ctx), ctx.source.num_classes)
        model.load_state_dict(state["ema"])
        return model.to(ctx.device).eval()

    return ctx.cached(f"denoiser:{inputs['diffusion'].sha256}", load)


def run_generation(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Sample a class group's images until ``images_per_class`` or its share of ``time_budget_s``:
    ``generated/images/...png``, ``generated/provenance/class=C.parquet``, ``generation/<shard>.json``.

    Without a time budget the images depend only on the denoiser, the sampling fields, the classes, the seed
    and the runtime, so they are shared across runs in ``<store>/shared/generated/<key>/`` (runs that differ in
    selection, labels or evaluation sample once; ``generation/<shard>.json`` keeps the first run's timing)."""
    cfg, dc = ctx.cfg, ctx.cfg.method.diffusion

    def sample_group() -> dict[str, bytes]:
        model, space = denoiser_of(ctx, inputs), diffusion_space(ctx)
        made, out = {c: 0 for c in shard.classes}, {}
        t0 = time.perf_counter()
        for c, start, count in generation_plan(dc, shard.classes, ctx.source.num_classes):
            images = generate_class(model, dc, space, c, start, count, cfg.seed, ctx.device, cfg.runtime)
            for j, img in enumerate(images):
                out[image_path("generated", c, start + j)] = png_bytes(to_uint8(img))
            made[c] = start + count
            progress.emit("step", "generation", shard.id, sum(made.values()), dc.images_per_class * len(made))
        seconds = time.perf_counter() - t0
        info = {"images": {str(c): n for c, n in made.items()}, "seconds": round(seconds, 3),
                "images_per_second": round(sum(made.values()) / max(seconds, 1e-9), 3), "device": str(ctx.device)}
        return {**out, f"generation/{shard.id}.json": json.dumps(info, indent=1).encode()}

    if dc.time_budget_s is None:
        out = shared_outputs(cfg, "generated", generation_key(ctx, shard), sample_group)
    else:  # how many images fit the budget depends on the machine and its load: always sample
        out = sample_group()
    files = [ctx.store.write_bytes(name, data) for name, data in sorted(out.items())]
    made = json.loads(out[f"generation/{shard.id}.json"])["images"]
    for c, n in made.items():
        table = provenance_table("generated", [synthetic_row(int(c), j, cfg.image_size) for j in range(n)])
        files.append(ctx.store.write_table(f"generated/provenance/class={int(c):05d}.parquet", table))
    return files


SAMPLING_FIELDS = ("sampler_steps", "guidance", "guidance_interval", "images_per_class", "sample_batch_size",
                   "time_budget_s")


def generation_key(ctx: Context, shard: Shard) -> str:
    """What a class group's generated images depend on: the denoiser, the sampling fields, the classes, seed,
    runtime and code."""
    cfg = ctx.cfg
    payload = {"denoiser": diffusion_key(ctx), "classes": list(shard.classes),
               "sampling": cfg.method.diffusion.model_dump(mode="json", include=set(SAMPLING_FIELDS)),
               "num_classes": ctx.source.num_classes, "seed": cfg.seed, "device": str(ctx.device),
               "runtime": json.loads(cfg.section_json("runtime")),
               "code": code_hash("diffusion", "generation", "stages")}
    return shared_key(payload)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


def generated_pool(ctx: Context, c: int) -> torch.Tensor:
    return load_class_images(ctx, "generated", c)[1]


def run_quality(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """How real the generated pool looks to the teacher: its accuracy on the pool (per class and overall) and the
    Frechet distance between teacher features of the pool and of real test images; a sample grid PNG."""
    cfg, src = ctx.cfg, ctx.source
    teacher = teacher_of(ctx, inputs).model
    mean, std = cfg.normalization
    pools = [generated_pool(ctx, c) for c in range(src.num_classes)]
    pool = ArraySplit("generated", torch.cat(pools).numpy(),
                      np.concatenate([np.full(len(p), c) for c, p in enumerate(pools)]), src.num_classes, "generated")
    everything = np.arange(len(pool))
    logits = predict_logits(teacher, normalize(pool.images, mean, std), cfg.labels.batch_size, ctx.device, cfg.runtime)
    correct = logits.argmax(1).numpy() == pool.labels
    n_ref = min(cfg.method.diffusion.reference_images, len(src.test))
    ref = np.sort(torch.randperm(len(src.test), generator=generator(cfg.seed, "quality"))[:n_ref].numpy())
    fd = frechet_distance(penultimate_features(teacher, pool, everything, mean, std, ctx.device, cfg.runtime).numpy(),
                          penultimate_features(teacher, src.test, ref, mean, std, ctx.device, cfg.runtime).numpy())
    quality = {
        "generated_images": len(pool), "reference_images": n_ref, "frechet_distance": round(fd, 6),
        "teacher_accuracy": round(float(correct.mean()), 6),
        "teacher_accuracy_per_class": {src.classes[c]: round(float(correct[pool.labels == c].mean()), 6)
                                       for c in range(src.num_classes)},
    }
    return [ctx.store.write_bytes("generation/quality.json", json.dumps(quality, indent=1).encode()),
            ctx.store.write_bytes("generation/grid.png", png_bytes(image_grid([p[:10] for p in pools])))]


def generated_picks(ctx: Context, select: str, c: int, images: torch.Tensor,
                    teacher: torch.nn.Module) -> tuple[list[int], np.ndarray | None]:
    """Which ``method.ipc`` of class ``c``'s generated ``images`` the rule ``select`` keeps (random, realism or
    diversity; see ``method.diffusion.select``), with their realism scores for realism (else None)."""
    cfg = ctx.cfg
    ipc, (mean, std) = cfg.method.ipc, cfg.normalization
    if select == "random":
        return torch.randperm(len(images), generator=generator(cfg.seed, "generated-select", c))[:ipc].tolist(), None
    if select == "realism":
        logits = predict_logits(teacher, normalize(images, mean, std), cfg.labels.batch_size, ctx.device, cfg.runtime)
        scores = torch.nn.functional.cross_entropy(logits, torch.full((len(images),), c), reduction="none").numpy()
        picks = top_k(scores, ipc, largest=False)
        return picks, scores[picks]
    pool = ArraySplit("generated", images.numpy(), np.full(len(images), c), ctx.source.num_classes, "generated")
    feats = penultimate_features(teacher, pool, np.arange(len(pool)), mean, std, ctx.device, cfg.runtime)
    return k_center_greedy(feats, ipc), None


def run_generated_selection(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Reduce each class's generated pool to ``ipc`` images by ``method.diffusion.select``."""
    cfg = ctx.cfg
    teacher = teacher_of(ctx, inputs).model
    files = []
    for c in shard.classes:
        paths, images = load_class_images(ctx, "generated", c)
        if len(images) < cfg.method.ipc:
            raise DataError(f"class {c}: {len(images)} generated images, fewer than method.ipc={cfg.method.ipc} "
                            "(raise method.diffusion.time_budget_s or images_per_class)")
        picks, scores = generated_picks(ctx, cfg.method.diffusion.select, c, images, teacher)
        size = cfg.image_size
        rows = [synthetic_row(c, j, size, source_id=paths[i], crop=size,
                              score=None if scores is None else float(scores[j])) for j, i in enumerate(picks)]
        files += write_image_set_class(ctx.store, "distilled", c, images[picks], rows)
    return files


_DIFFUSION = Stage("diffusion", ("dataset",), ("dataset",), single_shard("diffusion"), run_diffusion,
                   fingerprint=diffusion_key,
                   doc="train the class-conditional denoiser (shared across runs; resumes from its last checkpoint)")
_GENERATION = Stage("generation", ("dataset", "diffusion"), ("dataset", "method"), class_groups, run_generation,
                    doc="sample images per class with DPM-Solver until the count or the time budget")
_QUALITY = Stage("quality", ("dataset", "teacher", "generation"), ("dataset", "method"), single_shard("quality"),
                 run_quality,
                 doc="teacher accuracy and Frechet distance of the generated pool; a sample grid")
_GENERATED_SELECTION = Stage("synthesis", ("dataset", "teacher", "generation"), ("dataset", "method"), class_groups,
                             run_generated_selection, doc="keep ipc generated images per class")

_DYNAMICS = Stage("dynamics", ("dataset",), ("dataset", "teacher", "method", "evaluation"), _dynamics_shards, run_dynamics,
                  doc="train proxies on the full set; record each sample's EL2N and correctness at checkpoints")
_SELECTION = Stage("synthesis", ("dataset", "teacher"), ("dataset", "method"), class_groups, run_selection,
                   doc="keep ipc real images per class by the selection method")
_DYNAMICS_SELECTION = Stage("synthesis", ("dataset", "teacher", "dynamics"), ("dataset", "method"), class_groups,
                            run_selection, doc="keep ipc real images per class by their training-dynamics score")
_CA2D_SCORING = Stage("scoring", ("dataset", "teacher", "dynamics"), ("dataset", "method"), class_groups, run_scoring,
                      doc="CA2D: RDED's scoring on the candidate pool with the highest CAD")

METHODS: dict[str, tuple[Stage, ...]] = {
    "rded": RDED,
    "sre2l": (_BN_STATISTICS, _RECOVERY, _ASSEMBLY),
    "cda": (_BN_STATISTICS, _RECOVERY, _ASSEMBLY),
    "gvbsm": (_MOMENTS, _STATISTICS, _RECOVERY, _ASSEMBLY),
    "random": (_SELECTION,),
    "herding": (_SELECTION,),
    "kcenter": (_SELECTION,),
    "el2n": (_DYNAMICS, _DYNAMICS_SELECTION),
    "forgetting": (_DYNAMICS, _DYNAMICS_SELECTION),
    "cad": (_DYNAMICS, _DYNAMICS_SELECTION),
    "ca2d": (_DYNAMICS, _CA2D_SCORING, RDED[1]),
    "diffusion": (_DIFFUSION, _GENERATION, _QUALITY, _GENERATED_SELECTION),
}


def stages_for(cfg: RunConfig) -> list[Stage]:
    """The stages of a run, in order. The first stage always describes the dataset."""
    return [DATASET, TEACHER, *METHODS[cfg.method.name], RANDOM_SUBSET, LABELS, EVALUATION]
