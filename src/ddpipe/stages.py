"""The stages every run shares, and what each writes into the run folder.

The method's own stages (for RDED ``scoring`` and ``synthesis``) are in :mod:`ddpipe.methods`.

=============  ======================  =====================================================================
stage          shards                  outputs (relative to the run folder)
=============  ======================  =====================================================================
dataset        one                     ``dataset/classes.parquet``, ``dataset/dataset.json``
teacher        one per backbone        ``teacher/teacher.pt``, ``teacher/metrics.json`` (primary);
                                       ``teacher/memberK.pt``, ``teacher/memberK.json`` (teacher.ensemble)
scoring        class groups            ``scoring/class=CCCCC.parquet`` (:data:`ddpipe.rded.SCORES_SCHEMA`)
synthesis      class groups            ``distilled/images/CCCCC/classCCCCC_idJJJJJ.png``,
                                       ``distilled/provenance/class=CCCCC.parquet``
random_subset  class groups            ``random/images/...png``, ``random/provenance/...parquet``
labels         set x class groups      ``{distilled,random}/labels/class=CCCCC.parquet``
evaluation     set x regime x seed     ``evaluation/{set}-{regime}-seed{S}.json`` (main student),
               (x student)             ``evaluation/{set}-{regime}-seed{S}-student{K}.json`` (cross_models)
=============  ======================  =====================================================================
"""

from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ddpipe import progress
from ddpipe.augment import generator
from ddpipe.data import resize_center
from ddpipe.errors import CheckpointError, DataError, TeacherError
from ddpipe.evaluate import ImageSet, evaluate, student_models
from ddpipe.labels import expand, labels_table, region_views, regions, soft_labels
from ddpipe.manifests import StageManifest, stage_files
from ddpipe.pipeline import Context, Shard, Stage, code_hash, grown, shared_key, shared_outputs
from ddpipe.store import FileRecord, Store
from ddpipe.teacher import (
    Ensemble, Teacher, check_class_map, checkpoint_bytes, load_teacher, measure, read_checkpoint, train_teacher,
)

SETS = ("distilled", "random")

CLASSES_SCHEMA = pa.schema(
    [
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("train_images", pa.int64(), nullable=False),
        pa.field("test_images", pa.int64(), nullable=False),
    ]
)

PROVENANCE_SCHEMA = pa.schema(
    [
        pa.field("image", pa.string(), nullable=False),  # PNG path, relative to the run folder
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("ipc_index", pa.int32(), nullable=False),  # j in 0..ipc-1
        pa.field("region", pa.int16(), nullable=False),  # 0 = whole image, 1..f^2 = grid cell (row-major)
        pa.field("cell_top", pa.int16(), nullable=False),  # where the patch sits in the image
        pa.field("cell_left", pa.int16(), nullable=False),
        pa.field("cell_height", pa.int16(), nullable=False),
        pa.field("cell_width", pa.int16(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),  # train-split index of the source image
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("crop_top", pa.int32(), nullable=False),  # crop box in the source image (native pixels)
        pa.field("crop_left", pa.int32(), nullable=False),
        pa.field("crop_height", pa.int32(), nullable=False),
        pa.field("crop_width", pa.int32(), nullable=False),
        pa.field("score", pa.float32()),  # realism score of the patch (null for random-subset images)
    ]
)


# ---------------------------------------------------------------- helpers


def image_path(set_name: str, c: int, j: int) -> str:
    return f"{set_name}/images/{c:05d}/class{c:05d}_id{j:05d}.png"


def png_bytes(image: torch.Tensor) -> bytes:
    arr = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """uint8 images [n_i, C, H, W] per row -> one uint8 [C, H', W'] grid (rows: classes)."""
    c, h, w = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    grid = torch.full((c, len(rows) * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, top:top + h, left:left + w] = img
    return grid


def png_decode(data: bytes, channels: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def provenance_table(set_name: str, rows: list[dict]) -> pa.Table:
    """Provenance rows (one per image region; each names its ``class_index`` and ``ipc_index``) as a table."""
    return pa.table(
        {
            "image": [image_path(set_name, r["class_index"], r["ipc_index"]) for r in rows],
            "class_index": [r["class_index"] for r in rows],
            "ipc_index": [r["ipc_index"] for r in rows],
            "region": [r["region"] for r in rows],
            "cell_top": [r["cell"][0] for r in rows],
            "cell_left": [r["cell"][1] for r in rows],
            "cell_height": [r["cell"][2] for r in rows],
            "cell_width": [r["cell"][3] for r in rows],
            "source_index": [r["source_index"] for r in rows],
            "source_id": [r["source_id"] for r in rows],
            "crop_top": [r["top"] for r in rows],
            "crop_left": [r["left"] for r in rows],
            "crop_height": [r["height"] for r in rows],
            "crop_width": [r["width"] for r in rows],
            "score": [r.get("score") for r in rows],
        },
        schema=PROVENANCE_SCHEMA,
    )


def synthetic_row(c: int, j: int, size: int, source_id: str = "", crop: int = 0, score: float | None = None) -> dict:
    """Provenance row of whole synthetic image ``j`` of class ``c`` (no training image behind it: source_index -1).
    ``source_id`` and ``crop`` (the side of the crop box at 0, 0) name a generated image it was taken from."""
    return {"class_index": c, "ipc_index": j, "region": 0, "cell": (0, 0, size, size), "source_index": -1,
            "source_id": source_id, "top": 0, "left": 0, "height": crop, "width": crop, "score": score}


def write_image_set_class(store: Store, set_name: str, c: int, images: torch.Tensor, rows: list[dict]) -> list[FileRecord]:
    """PNG per image plus the class's provenance table (one row per image region)."""
    files = [store.write_bytes(image_path(set_name, c, j), png_bytes(img)) for j, img in enumerate(images)]
    table = provenance_table(set_name, [{**r, "class_index": c} for r in rows])
    files.append(store.write_table(f"{set_name}/provenance/class={c:05d}.parquet", table))
    return files


def dataset_classes(store: Store, dataset: StageManifest) -> list[str]:
    """The class names, in class-index order, from the dataset stage's outputs."""
    path = next(f.path for f in stage_files(store, dataset) if f.path.endswith("classes.parquet"))
    return store.read_table(path).column("class_name").to_pylist()


def teacher_of(ctx: Context, manifests: dict[str, StageManifest], k: int = 0) -> Teacher:
    """Teacher ``k`` of the run (0: the primary), loaded once per process and checked against the data's class map."""
    sha = manifests["teacher"].sha256
    path = teacher_files(k)[0]

    def load():
        classes = dataset_classes(ctx.store, manifests["dataset"])
        return load_teacher(ctx.store.read_bytes(path), ctx.store.url(path), classes, ctx.cfg, ctx.device)

    return ctx.cached(f"teacher:{sha}:{k}", load)


def teachers_of(ctx: Context, manifests: dict[str, StageManifest]) -> list[Teacher]:
    """Every teacher of the run: the primary, then ``teacher.ensemble``."""
    return [teacher_of(ctx, manifests, k) for k in range(len(ctx.cfg.teacher_models))]


def label_model(ctx: Context, manifests: dict[str, StageManifest]) -> torch.nn.Module:
    """The network that gives soft labels and online-KD targets: the primary teacher, or with
    ``labels.ensemble`` every teacher combined (:class:`~ddpipe.teacher.Ensemble`)."""
    if not ctx.cfg.labels.ensemble:
        return teacher_of(ctx, manifests).model
    return Ensemble([t.model for t in teachers_of(ctx, manifests)], ctx.cfg.labels.logit_norm)


def class_groups(ctx: Context, num_classes: int) -> list[Shard]:
    """Consecutive classes, ``orchestration.classes_per_shard`` per shard (more when there would be more than
    ``orchestration.max_shards_per_stage`` shards)."""
    orch = ctx.cfg.orchestration
    size = grown(orch.classes_per_shard, num_classes, orch.max_shards_per_stage)
    return [
        Shard(id=f"classes-{s:05d}-{min(s + size, num_classes) - 1:05d}", classes=tuple(range(s, min(s + size, num_classes))))
        for s in range(0, num_classes, size)
    ]


# ---------------------------------------------------------------- dataset


def check_class_sizes(cfg, src) -> None:
    """Every class must have enough training images for the method; the test split must not be empty."""
    need = cfg.patches_per_class
    for c, n in enumerate(src.train.class_counts()):
        if n < need:
            raise DataError(
                f"method.ipc={cfg.method.ipc} needs {need} training images per class (factor^2 x ipc with factor "
                f"{cfg.factor}), but class '{src.classes[c]}' has {n}"
            )
    if len(src.test) == 0:
        raise DataError("the test split has no images")


def run_dataset(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    cfg, src = ctx.cfg, ctx.source
    check_class_sizes(cfg, src)
    train, test = src.train.class_counts(), src.test.class_counts()
    table = pa.table(
        {"class_index": list(range(src.num_classes)), "class_name": src.classes, "train_images": train.tolist(),
         "test_images": test.tolist()},
        schema=CLASSES_SCHEMA,
    )
    info = {
        "kind": src.kind, "fingerprint": src.fingerprint, "train_fingerprint": src.train.fingerprint,
        "test_fingerprint": src.test.fingerprint, "num_classes": src.num_classes, "image_size": cfg.image_size,
        "channels": cfg.channels, "train_images": len(src.train), "test_images": len(src.test),
    }
    return [
        ctx.store.write_table("dataset/classes.parquet", table),
        ctx.store.write_bytes("dataset/dataset.json", json.dumps(info, indent=1, sort_keys=True).encode()),
    ]


# ---------------------------------------------------------------- teacher


def read_external(uri: str, storage_options: dict) -> bytes:
    try:
        with fsspec.open(uri, "rb", **(storage_options if "://" in uri else {})) as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"teacher checkpoint not found: {uri} (teacher.checkpoint)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read teacher checkpoint {uri}: {e}") from None


def teacher_files(k: int) -> tuple[str, str]:
    """(checkpoint, metrics) paths of teacher ``k`` (0: the primary teacher) in the run folder."""
    return ("teacher/teacher.pt", "teacher/metrics.json") if k == 0 else (f"teacher/member{k}.pt", f"teacher/member{k}.json")


def teacher_key(cfg, source, k: int) -> str:
    """What a trained teacher depends on: data, recipe, backbone, seed, and the training code."""
    recipe = json.loads(cfg.section_json("teacher"))["teacher"]
    for field in ("ensemble", "checkpoint", "min_val_accuracy", "model"):
        recipe.pop(field)
    payload = {
        "data": source.fingerprint, "dataset": json.loads(cfg.section_json("dataset")), "recipe": recipe,
        "model": cfg.teacher_models[k].model_dump(mode="json"), "member": k, "seed": cfg.seed,
        "code": code_hash("augment", "data", "models", "teacher", "train"),
    }
    return shared_key(payload)


def run_teacher(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """Teacher ``shard.teacher``: loaded from ``teacher.checkpoint`` (primary only) or trained, shared across runs."""
    cfg, src, store = ctx.cfg, ctx.source, ctx.store
    k = shard.teacher
    spec = cfg.teacher_models[k]
    classes = dataset_classes(store, inputs["dataset"])
    if k == 0 and cfg.teacher.checkpoint:
        data = read_external(cfg.teacher.checkpoint, cfg.store.storage_options)
        teacher = load_teacher(data, cfg.teacher.checkpoint, classes, cfg, ctx.device)
        acc, origin = measure(teacher.model, cfg, src, ctx.device), cfg.teacher.checkpoint
    else:
        def train() -> dict[str, bytes]:
            model = train_teacher(cfg, src, ctx.device, progress.stepper("teacher", shard.id, every=10), k)
            acc = measure(model, cfg, src, ctx.device)
            return {"teacher.pt": checkpoint_bytes(model, cfg, src, spec, acc)}

        data = shared_outputs(cfg, "teachers", teacher_key(cfg, src, k), train)["teacher.pt"]
        acc, origin = float(read_checkpoint(data, "teacher.pt")["val_accuracy"]), "trained"
    if acc < cfg.teacher.min_val_accuracy:
        raise TeacherError(
            f"teacher {spec.name} test accuracy {acc:.4f} is below teacher.min_val_accuracy={cfg.teacher.min_val_accuracy}"
        )
    metrics = {"val_accuracy": round(acc, 6), "origin": origin, "test_images": len(src.test), "model": spec.name}
    ckpt, metrics_path = teacher_files(k)
    return [
        store.write_bytes(ckpt, data),
        store.write_bytes(metrics_path, json.dumps(metrics, indent=1, sort_keys=True).encode()),
    ]


def check_teacher_checkpoint(cfg, classes: list[str]) -> None:
    """Fail early if ``teacher.checkpoint`` is missing, unreadable or for another class map."""
    if cfg.teacher.checkpoint:
        payload = read_checkpoint(read_external(cfg.teacher.checkpoint, cfg.store.storage_options), cfg.teacher.checkpoint)
        check_class_map(payload["classes"], classes, cfg.teacher.checkpoint)


# ---------------------------------------------------------------- random subset, labels, evaluation


def random_picks(cfg, split, c: int) -> np.ndarray:
    """The random subset's ``ipc`` training images of class ``c`` (split positions)."""
    pool = split.class_indices(c)
    return pool[torch.randperm(len(pool), generator=generator(cfg.seed, "random", c))[: cfg.method.ipc].numpy()]


def write_real_images(ctx: Context, set_name: str, c: int, picks, scores=None) -> list[FileRecord]:
    """Whole training images ``picks`` of class ``c`` (centre-cropped, resized), stored as image set
    ``set_name`` with their provenance (``scores``: the selection score of each, or none)."""
    split, size = ctx.source.train, ctx.cfg.image_size
    images, rows = [], []
    for j, i in enumerate(picks):
        native = split.image(int(i))
        h, w = native.shape[1:]
        side = min(h, w)
        images.append(resize_center(native, size))
        rows.append({"ipc_index": j, "region": 0, "cell": (0, 0, size, size), "source_index": int(i),
                     "source_id": split.source_id(int(i)), "top": (h - side) // 2, "left": (w - side) // 2,
                     "height": side, "width": side, "score": None if scores is None else float(scores[j])})
    return write_image_set_class(ctx.store, set_name, c, torch.stack(images), rows)


def run_random_subset(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    """The baseline: ``ipc`` real images per class drawn at random, stored like a distilled set."""
    files = []
    for c in shard.classes:
        files += write_real_images(ctx, "random", c, random_picks(ctx.cfg, ctx.source.train, c))
    return files


def set_factor(ctx: Context, set_name: str) -> int:
    return ctx.cfg.factor if set_name == "distilled" else 1


def load_class_images(ctx: Context, set_name: str, c: int) -> tuple[list[str], torch.Tensor]:
    prov = ctx.store.read_table(f"{set_name}/provenance/class={c:05d}.parquet")
    paths = list(dict.fromkeys(prov.column("image").to_pylist()))
    images = torch.stack([png_decode(ctx.store.read_bytes(p), ctx.cfg.channels) for p in paths])
    return paths, images


def run_labels(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
    model = label_model(ctx, inputs)
    factor = set_factor(ctx, shard.set)
    num_classes = len(dataset_classes(ctx.store, inputs["dataset"]))
    files = []
    for c in shard.classes:
        paths, images = load_class_images(ctx, shard.set, c)
        views, meta = region_views(images, factor)
        probs = soft_labels(model, views, ctx.cfg, ctx.device)
        table = labels_table(paths, [c] * len(paths), meta, probs, num_classes, ctx.cfg.labels)
        files.append(ctx.store.write_table(f"{shard.set}/labels/class={c:05d}.parquet", table))
    return files


def load_image_set(ctx: Context, set_name: str, num_classes: int, with_labels: bool) -> ImageSet:
    images, classes, soft = [], [], []
    for c in range(num_classes):
        _, imgs = load_class_images(ctx, set_name, c)
        images.append(imgs)
        classes += [c] * len(imgs)
        if with_labels:
            table = ctx.store.read_table(f"{set_name}/labels/class={c:05d}.parquet")
            soft.append(expand(table).view(len(imgs), -1, num_classes))
    size = ctx.cfg.image_size
    return ImageSet(
        images=torch.cat(images), classes=torch.tensor(classes, dtype=torch.int64),
        soft=torch.cat(soft) if with_labels else None, regions=regions(size, set_factor(ctx, set_name)),
    )


def run_evaluation(ctx: Context, shard: Shard, inputs) -> list[FileRecord]:
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
    if shard.set in ("random", "full"):  # the same reference student for every method run with the same inputs and recipe
        out = shared_outputs(ctx.cfg, "baselines", baseline_key(ctx, shard, inputs), compute)
    else:
        out = compute()
    return [ctx.store.write_bytes(rel, out["result.json"])]


def full_set(ctx: Context, num_classes: int) -> ImageSet:
    """The whole training split as an image set, trained with the budget of the ipc sets."""
    split = ctx.source.train
    images = split.batch(np.arange(len(split)))
    return ImageSet(images=images, classes=torch.from_numpy(split.labels).long(),
                    regions=regions(ctx.cfg.image_size, 1), budget_images=ctx.cfg.method.ipc * num_classes)


def baseline_key(ctx: Context, shard: Shard, inputs) -> str:
    """What a reference student (random subset, full set) depends on: the subset's images and labels and the
    teachers (online KD), the data, the student recipe and budget, the regime and seed, and the code."""
    cfg = ctx.cfg
    files = []
    if shard.set == "random":
        files += [f for f in stage_files(ctx.store, inputs["random_subset"])]
        files += [f for f in stage_files(ctx.store, inputs["labels"]) if f.path.startswith("random/")]
        files += [f for f in stage_files(ctx.store, inputs["teacher"]) if f.path.endswith(".pt")]
    payload = {
        "set": shard.set, "files": sorted((f.path, f.sha256) for f in files), "test": ctx.source.test.fingerprint,
        "train": ctx.source.train.fingerprint,
        "sections": json.loads(cfg.section_json("evaluation", "labels")), "ipc": cfg.method.ipc, "seed": cfg.seed,
        "regime": shard.regime, "student": shard.seed, "model": shard.student or 0,
        "code": code_hash("augment", "data", "evaluate", "labels", "models", "teacher", "train"),
    }
    return shared_key(payload)


def preflight(cfg) -> None:
    """The checks that need no teacher: store writable, data present and big enough, checkpoint class map.

    The stages repeat them where they matter; this runs them up front so a bad input fails in a second.
    """
    from ddpipe.pipeline import context_for

    ctx = context_for(cfg)
    ctx.store.check_writable()
    check_class_sizes(cfg, ctx.source)
    check_teacher_checkpoint(cfg, ctx.source.classes)


# ---------------------------------------------------------------- the shared stages


def single_shard(name: str):
    """A stage plan of one shard named ``name``."""
    return lambda ctx, num_classes: [Shard(id=name)]


def _teacher_shards(ctx: Context, num_classes: int) -> list[Shard]:
    return [Shard(id="teacher" if k == 0 else f"member{k}-{spec.name}", teacher=k)
            for k, spec in enumerate(ctx.cfg.teacher_models)]


def _label_shards(ctx: Context, num_classes: int) -> list[Shard]:
    return [
        Shard(id=f"{s}-{g.id}", classes=g.classes, set=s) for s in SETS for g in class_groups(ctx, num_classes)
    ]


def _eval_shards(ctx: Context, num_classes: int) -> list[Shard]:
    ev = ctx.cfg.evaluation
    return [
        Shard(id=f"{s}-{r}-seed{seed}" + (f"-student{k}" if k else ""), set=s, regime=r, seed=seed, student=k)
        for k in range(len(student_models(ctx.cfg))) for r in ev.regimes for seed in ev.seeds
        for s in SETS if s == "distilled" or ev.baseline
    ] + [Shard(id=f"full-hard-seed{seed}", set="full", regime="hard", seed=seed, student=0)
         for seed in ev.seeds if ev.full and "hard" in ev.regimes]


# Every method's run starts with DATASET and TEACHER, then its own stages, the last of which is named
# "synthesis" and writes the distilled set (distilled/images, distilled/provenance); then the baseline,
# the labels and the evaluation, which are the same for every method (see ddpipe.methods).
DATASET = Stage("dataset", (), ("dataset", "method"), single_shard("dataset"), run_dataset,
                fingerprint=lambda ctx: ctx.source.fingerprint,
                doc="list classes, count images, fingerprint the data")
TEACHER = Stage("teacher", ("dataset",), ("dataset", "teacher"), _teacher_shards, run_teacher,
                doc="train (or load) and measure each teacher (shared across runs in the store's shared/teachers)")
RANDOM_SUBSET = Stage("random_subset", ("dataset",), ("dataset", "method"), class_groups, run_random_subset,
                      doc="draw the random-subset baseline")
LABELS = Stage("labels", ("dataset", "teacher", "synthesis", "random_subset"), ("dataset", "method", "labels"),
               _label_shards, run_labels, doc="soft labels from the teacher for every region of both sets")
EVALUATION = Stage("evaluation", ("dataset", "teacher", "synthesis", "random_subset", "labels"),
                   ("dataset", "method", "labels", "evaluation"), _eval_shards, run_evaluation,
                   doc="train students under every regime and measure test accuracy")
