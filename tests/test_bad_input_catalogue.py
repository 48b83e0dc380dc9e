"""The catalogue of bad inputs: each kind gets exactly one ``ddpipe: error:`` line on stderr naming the field, file
or class, exit status 2, and no new shard record or stage manifest.

Each case runs the CLI's ``main`` in this process (the plain engine; ``tests/test_bad_input.py`` covers the
Prefect engine end to end), so that the whole catalogue takes seconds. A case is a function that prepares its
input under ``tmp_path`` and returns the CLI arguments; the fragments must all appear in the error line.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddpipe.cli import main
from ddpipe.config import load_config
from ddpipe.data import FASHION_MNIST_CLASSES, find_fashion_mnist
from ddpipe.teacher import CHECKPOINT_FORMAT

pytestmark = pytest.mark.fmnist

# A run small enough that the cases which get past the config reach the data and the store within a second.
TINY = {
    "name": "tiny",
    "dataset": {"kind": "fashion-mnist", "train_per_class": 12, "test_per_class": 4},
    "teacher": {"model": {"name": "convnet", "width": 8, "depth": 2, "norm": "batch"}, "epochs": 1,
                "batch_size": 40},
    "method": {"name": "rded", "ipc": 1, "candidates_per_class": 4, "crops_per_image": 2},
    "evaluation": {"model": {"name": "convnet", "width": 8, "depth": 2}, "epochs": 1, "seeds": [0],
                   "regimes": ["hard"]},
    "runtime": {"num_threads": 1},
}

CASES = []


def case(name: str, *fragments: str, stage: str | None = None):
    """Register a bad-input case: ``fn(tmp_path) -> argv``; ``stage``: the stage it fails in (None: before any)."""
    def register(fn):
        CASES.append(pytest.param(fn, fragments, stage, id=name))
        return fn
    return register


def write_config(tmp: Path, data: dict | None = None, **sections) -> Path:
    cfg = json.loads(json.dumps(data if data is not None else TINY))
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(tmp: Path, config: Path | None = None, *extra: str) -> list[str]:
    return ["run", str(config or write_config(tmp)), "--store", str(tmp / "runs"), "--engine", "plain",
            "--no-progress", *extra]


def override(*assignments: str):
    def make(tmp):
        return run(tmp, None, *[a for s in assignments for a in ("--set", s)])
    return make


# ---------------------------------------------------------------- config files
@case("config-missing", "config file not found")
def _(tmp):
    return run(tmp, tmp / "nope.yaml")


def config_file(content: bytes):
    """A case whose config file holds ``content``."""
    def make(tmp):
        (tmp / "c.yaml").write_bytes(content)
        return run(tmp, tmp / "c.yaml")
    return make


case("config-not-yaml", "is not valid YAML")(config_file(b"name: [unclosed\n"))
case("config-binary", "is not UTF-8 text")(config_file(bytes(range(256)) * 4))
case("config-not-a-mapping", "must hold a mapping")(config_file(b"- a\n- b\n"))


@case("config-is-a-folder", "config file not found")
def _(tmp):
    (tmp / "c.yaml").mkdir()
    return run(tmp, tmp / "c.yaml")


@case("config-base-missing", "config file not found", "gone.yaml")
def _(tmp):
    return run(tmp, write_config(tmp, {**TINY, "base": "gone.yaml"}))


@case("config-base-loop", "includes itself")
def _(tmp):
    return run(tmp, write_config(tmp, {**TINY, "base": "config.yaml"}))


@case("config-base-not-a-name", "'base' must be a file name")
def _(tmp):
    return run(tmp, write_config(tmp, {**TINY, "base": 3}))


@case("config-missing-name", "missing config field 'name'")
def _(tmp):
    return run(tmp, write_config(tmp, {k: v for k, v in TINY.items() if k != "name"}))


@case("config-bad-name", "invalid config field 'name'")
def _(tmp):
    return run(tmp, write_config(tmp, {**TINY, "name": "Has Spaces"}))


@case("config-unknown-section", "unknown config field 'teachers'")
def _(tmp):
    return run(tmp, write_config(tmp, {**TINY, "teachers": {}}))


@case("config-section-not-a-mapping", "invalid config field 'teacher'")
def _(tmp):
    return run(tmp, write_config(tmp, {**TINY, "teacher": 3}))


# ---------------------------------------------------------------- fields
for name, assignment, fragments in [
    ("unknown-field", "teacher.epochz=3", ("unknown config field 'teacher.epochz'",)),
    ("wrong-type", "teacher.epochs=many", ("teacher.epochs",)),
    ("negative-epochs", "teacher.epochs=-1", ("teacher.epochs",)),
    ("infinite-epochs", "teacher.epochs=.inf", ("teacher.epochs",)),
    ("nan-lr", "teacher.optim.lr=.nan", ("teacher.optim.lr",)),
    ("infinite-temperature", "labels.temperature=.inf", ("labels.temperature",)),
    ("label-dtype", "labels.dtype=int8", ("labels.dtype",)),
    ("zero-top-k", "labels.top_k=0", ("labels.top_k",)),
    ("zero-ipc", "method.ipc=0", ("method.ipc",)),
    ("unknown-method", "method.name=magic", ("method.name",)),
    ("unknown-dataset-kind", "dataset.kind=tfrecord", ("dataset.kind",)),
    ("unknown-model", "teacher.model.name=vit_huge", ("teacher.model.name",)),
    ("unknown-regime", "evaluation.regimes=[hard,telepathy]", ("evaluation.regimes",)),
    ("unknown-optimizer", "teacher.optim.optimizer=lion", ("teacher.optim.optimizer",)),
    ("fmnist-image-size", "dataset.image_size=32", ("dataset.image_size must be 28",)),
    ("mean-length", "dataset.mean=[0.5,0.5]", ("dataset.mean has 2 values for 1 channel",)),
    ("std-length", "dataset.std=[0.3,0.3,0.3]", ("dataset.std has 3 values for 1 channel",)),
    ("std-zero", "dataset.std=[0.0]", ("dataset.std must be positive",)),
    ("factor-too-large", "method.factor=64", ("method.factor cannot exceed the image size",)),
    ("recovery-without-batch-norm", ("method.name=sre2l", "teacher.model.norm=instance"), ("needs norm: batch",)),
    ("too-few-candidates", "method.ipc=5", ("method.candidates_per_class (4) must be at least",)),
    ("ensemble-labels-without-ensemble", "labels.ensemble=true", ("labels.ensemble",)),
    ("unknown-device", "runtime.device=tpu", ("runtime.device",)),
    ("cuda-index-string", "runtime.device=cuda:x", ("runtime.device",)),
    ("zero-threads", "runtime.num_threads=0", ("runtime.num_threads",)),
    ("negative-workers", "runtime.loader_workers=-1", ("runtime.loader_workers",)),
    ("zero-classes-per-shard", "orchestration.classes_per_shard=0", ("orchestration.classes_per_shard",)),
    ("zero-batch", "teacher.batch_size=0", ("teacher.batch_size",)),
    ("negative-label-smoothing", "teacher.label_smoothing=-0.1", ("teacher.label_smoothing",)),
    ("storage-options-not-a-mapping", "store.storage_options=3", ("store.storage_options",)),
    ("storage-options-unknown-key", "store.storage_options={endpoint_url: http://x}",
     ("store.storage_options has key 'endpoint_url'", "local filesystem")),
    ("dataset-storage-options-unknown-key", "dataset.storage_options={anon: true}",
     ("dataset.storage_options has key 'anon'",)),
    ("duplicate-seeds", "evaluation.seeds=[0, 1, 0]", ("evaluation.seeds", "seed 0 is listed twice")),
    ("top-k-above-classes", "labels.top_k=11", ("labels.top_k=11 is above the 10 classes",)),
    ("flip-against-the-data", ("dataset.flip=false", "teacher.augment={flip: true}"),
     ("teacher.augment.flip is true but dataset.flip is false",)),
]:
    case(f"field-{name}", *fragments)(override(*([assignment] if isinstance(assignment, str) else assignment)))


# ---------------------------------------------------------------- overrides
for name, assignment, fragments in [
    ("no-equals", "method.ipc", ("must look like key=value",)),
    ("empty-key", "=3", ("has an empty key",)),
    ("empty-part", "method..ipc=3", ("'method..ipc' has an empty part",)),
    ("trailing-dot", "method.ipc.=3", ("has an empty part",)),
    ("bad-yaml-value", "method.ipc=[1,", ("value is not valid YAML",)),
    ("into-a-value", "name.sub=1", ("'name' is not a section",)),
]:
    case(f"override-{name}", *fragments)(override(assignment))


# ---------------------------------------------------------------- devices
@case("device-cuda-without-gpu", "runtime.device=cuda", "no CUDA device")
def _(tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return override("runtime.device=cuda")(tmp)


@case("device-mps-unavailable", "runtime.device=mps", "MPS is not available")
def _(tmp):
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    return override("runtime.device=mps")(tmp)


# ---------------------------------------------------------------- Fashion-MNIST IDX files
def idx_copy(tmp: Path) -> Path:
    folder = tmp / "fmnist"
    shutil.copytree(find_fashion_mnist(None), folder)
    return folder


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1)


def fmnist_at(folder: Path):
    return lambda tmp: run(tmp, write_config(tmp, dataset={"root": str(folder)}))


@case("idx-missing-folder", "Fashion-MNIST IDX files not found")
def _(tmp):
    return fmnist_at(tmp / "nowhere")(tmp)


@case("idx-missing-labels", "t10k-labels-idx1-ubyte[.gz] missing")
def _(tmp):
    folder = idx_copy(tmp)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    return fmnist_at(folder)(tmp)


@case("idx-gz-corrupt-body", "cannot read IDX file", "t10k-images-idx3-ubyte.gz")
def _(tmp):
    folder = idx_copy(tmp)
    path = folder / "t10k-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[200:400] = b"\x00" * 200
    path.write_bytes(bytes(data))
    return fmnist_at(folder)(tmp)


@case("idx-not-gzip", "cannot read IDX file", "train-labels-idx1-ubyte.gz")
def _(tmp):
    folder = idx_copy(tmp)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    return fmnist_at(folder)(tmp)


@case("idx-bad-magic", "bad header")
def _(tmp):
    folder = idx_copy(tmp)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(8)))
    return fmnist_at(folder)(tmp)


@case("idx-truncated", "is truncated")
def _(tmp):
    folder = idx_copy(tmp)
    data = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[: len(data) // 2], compresslevel=1))
    return fmnist_at(folder)(tmp)


@case("idx-labels-out-of-range", "t10k-labels-idx1-ubyte.gz", "label 12 of image 3")
def _(tmp):
    folder = idx_copy(tmp)
    labels = np.frombuffer(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8).copy()
    labels[3] = 12
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(idx_bytes(labels))
    return fmnist_at(folder)(tmp)


@case("idx-labels-out-of-range-unsliced", "train-labels-idx1-ubyte.gz", "label 200 of image 0")
def _(tmp):
    folder = idx_copy(tmp)
    raw = gzip.decompress((folder / "train-labels-idx1-ubyte.gz").read_bytes())
    labels = np.frombuffer(raw[8:], np.uint8).copy()
    labels[0] = 200
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(idx_bytes(labels))
    config = dict(TINY, dataset={"kind": "fashion-mnist", "root": str(folder)})
    return run(tmp, write_config(tmp, config))


@case("idx-images-of-another-size", "t10k-images-idx3-ubyte.gz", "[32, 32]", "28 x 28")
def _(tmp):
    folder = idx_copy(tmp)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(idx_bytes(np.zeros((10000, 32, 32))))
    return fmnist_at(folder)(tmp)


@case("idx-count-mismatch", "10 images but 10000 labels")
def _(tmp):
    folder = idx_copy(tmp)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(idx_bytes(np.zeros((10, 28, 28))))
    return fmnist_at(folder)(tmp)


# ---------------------------------------------------------------- image folders
@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> Path:
    from test_data import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("folder") / "data", per_class=8)


def folder_case(tmp: Path, root: Path, **dataset) -> list[str]:
    data = dict(TINY, dataset={"kind": "image-folder", "root": str(root), "image_size": 28, "channels": 1, **dataset},
                method={**TINY["method"], "candidates_per_class": 4})
    return run(tmp, write_config(tmp, data))


def folder_copy(tmp: Path) -> Path:
    root = tmp / "data"
    shutil.copytree(FOLDER[0], root)
    return root


FOLDER: list[Path] = []  # set by the autouse fixture below for the folder cases


@case("folder-missing-root", "dataset folder", "nowhere/train not found")
def _(tmp):
    return folder_case(tmp, tmp / "nowhere")


@case("folder-missing-train-split", "train")
def _(tmp):
    root = folder_copy(tmp)
    shutil.rmtree(root / "train")
    return folder_case(tmp, root)


@case("folder-image-size-missing", "dataset.image_size is required")
def _(tmp):
    data = dict(TINY, dataset={"kind": "image-folder", "root": str(tmp)})
    return run(tmp, write_config(tmp, data))


@case("folder-truncated-png", "img002.png", stage="teacher")
def _(tmp):
    root = folder_copy(tmp)
    (root / "train" / "n00000001" / "img002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder_case(tmp, root)


@case("folder-text-as-image", "img003.png", "not an image", stage="teacher")
def _(tmp):
    root = folder_copy(tmp)
    (root / "train" / "n00000002" / "img003.png").write_text("hello, I am text")
    return folder_case(tmp, root)


@case("folder-decompression-bomb", "img001.png", "too large to decode", stage="teacher")
def _(tmp):
    root = folder_copy(tmp)
    Image.new("L", (14000, 14000)).save(root / "train" / "n00000000" / "img001.png")  # 196 M pixels: > 2 x 89 M
    return folder_case(tmp, root)


@case("folder-ipc-above-class-size", "method.ipc=9", "'n00000000' has 7 after 1 held out for validation")
def _(tmp):
    root = folder_copy(tmp)
    data = dict(TINY, dataset={"kind": "image-folder", "root": str(root), "image_size": 28, "channels": 1},
                method={**TINY["method"], "ipc": 9, "candidates_per_class": 9})
    return run(tmp, write_config(tmp, data))


@case("folder-test-split-lacks-a-class", "test split has no images of 1 of the 3 training classes", "'n00000001'")
def _(tmp):
    root = folder_copy(tmp)
    shutil.rmtree(root / "val" / "n00000001")
    return folder_case(tmp, root)


# ---------------------------------------------------------------- teacher checkpoints
def checkpoint(tmp: Path, **changes) -> list[str]:
    payload = {"format": CHECKPOINT_FORMAT, "model": {"name": "convnet", "width": 8, "depth": 2, "norm": "batch"},
               "state_dict": {}, "classes": list(FASHION_MNIST_CLASSES), "image_size": 28, "channels": 1,
               "mean": [0.2861], "std": [0.353], "val_accuracy": 0.5}
    for k, v in changes.items():
        if v is None:
            payload.pop(k)
        else:
            payload[k] = v
    buf = io.BytesIO()
    torch.save(payload, buf)
    (tmp / "teacher.pt").write_bytes(buf.getvalue())
    return override(f"teacher.checkpoint={tmp / 'teacher.pt'}")(tmp)


@case("checkpoint-missing", "teacher checkpoint not found")
def _(tmp):
    return override(f"teacher.checkpoint={tmp / 'missing.pt'}")(tmp)


@case("checkpoint-garbage", "teacher.pt is not readable")
def _(tmp):
    (tmp / "teacher.pt").write_bytes(b"\x00garbage" * 100)
    return override(f"teacher.checkpoint={tmp / 'teacher.pt'}")(tmp)


@case("checkpoint-other-format", "is not a ddpipe teacher checkpoint")
def _(tmp):
    return checkpoint(tmp, format="someone-else/3")


@case("checkpoint-invalid-model-spec", "field 'model' is not a valid model spec", "name")
def _(tmp):
    return checkpoint(tmp, model={"name": "no-such-net"})


@case("checkpoint-without-classes", "field 'classes' must list the class names")
def _(tmp):
    return checkpoint(tmp, classes=None)


@case("checkpoint-classes-not-names", "field 'classes'")
def _(tmp):
    return checkpoint(tmp, classes=[1, 2, 3])


@case("checkpoint-without-image-size", "field 'image_size'")
def _(tmp):
    return checkpoint(tmp, image_size=None)


@case("checkpoint-mean-length", "field 'mean' must hold 1 number")
def _(tmp):
    return checkpoint(tmp, mean=[0.1, 0.2, 0.3])


@case("checkpoint-other-class-map", "another class map", "class 0 is 'cat'")
def _(tmp):
    return checkpoint(tmp, classes=["cat", *FASHION_MNIST_CLASSES[1:]])


@case("checkpoint-other-class-count", "another class map", "3 classes in the checkpoint")
def _(tmp):
    return checkpoint(tmp, classes=list(FASHION_MNIST_CLASSES[:3]))


# ---------------------------------------------------------------- stores and run folders
def run_folder(tmp: Path) -> Path:
    return tmp / "runs" / load_config(write_config(tmp)).run_name


@case("store-is-a-file", "cannot be written")
def _(tmp):
    (tmp / "blocker").write_text("a file")
    return ["run", str(write_config(tmp)), "--store", str(tmp / "blocker" / "runs"), "--engine", "plain",
            "--no-progress"]


@case("store-unknown-protocol", "cannot open store", "nosuchproto")
def _(tmp):
    return ["run", str(write_config(tmp)), "--store", "nosuchproto://bucket/runs", "--engine", "plain",
            "--no-progress"]


@case("run-json-corrupt", "run.json is not valid JSON")
def _(tmp):
    folder = run_folder(tmp)
    folder.mkdir(parents=True)
    (folder / "run.json").write_text('{"run": "tiny", "tok')
    return run(tmp)


@case("run-json-without-token", "run.json holds no run token")
def _(tmp):
    folder = run_folder(tmp)
    folder.mkdir(parents=True)
    (folder / "run.json").write_text('{"run": "tiny"}')
    return run(tmp)


@case("status-not-a-run-folder", "has no manifests/plan.parquet")
def _(tmp):
    (tmp / "empty").mkdir()
    return ["status", str(tmp / "empty")]


@case("status-corrupt-plan", "plan.parquet is not a readable Parquet file")
def _(tmp):
    (tmp / "r" / "manifests").mkdir(parents=True)
    (tmp / "r" / "manifests" / "plan.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    return ["status", str(tmp / "r")]


@case("status-corrupt-report", "report.json is not valid JSON")
def _(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / "r" / "manifests").mkdir(parents=True)
    pq.write_table(pa.table({"stage": ["dataset"], "shard": ["dataset"], "classes": [[0]]}),
                   tmp / "r" / "manifests" / "plan.parquet")
    (tmp / "r" / "report.json").write_text("{")
    return ["status", str(tmp / "r")]


# ---------------------------------------------------------------- the test
def new_records(store: Path, before: set[str]) -> list[str]:
    """Shard records and stage manifests written since ``before`` (the plan is neither)."""
    if not store.exists():
        return []
    now = {p.relative_to(store).as_posix() for p in store.rglob("manifests/**/*.parquet")}
    return sorted(p for p in now - before if not p.endswith("manifests/plan.parquet"))


@pytest.fixture(autouse=True)
def _folder(request):
    if request.node.name.startswith("test_bad_input[folder-"):
        FOLDER[:] = [request.getfixturevalue("folder_data")]
    yield


@pytest.mark.parametrize("make, fragments, stage", CASES)
def test_bad_input(make, fragments, stage, tmp_path, capsys):
    argv = make(tmp_path)
    store = tmp_path / "runs"
    before = {p.relative_to(store).as_posix() for p in store.rglob("manifests/**/*.parquet")} if store.exists() else set()
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, lines
    assert lines[0].startswith("ddpipe: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    written = new_records(store, before)
    if stage is None:
        assert written == [], written
    else:
        assert not [p for p in written if p.endswith(f"manifests/{stage}.parquet") or f"manifests/{stage}/" in p], written
    assert not list(store.rglob("report.json")) if store.exists() else True


def test_the_catalogue_has_sixty_kinds():
    assert len(CASES) >= 60, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)

