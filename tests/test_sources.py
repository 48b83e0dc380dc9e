"""Image folders, WebDataset tars and Parquet shards on fsspec URLs, read through the dataset index.

The data is real: Fashion-MNIST rendered as ImageNet-sized RGB JPEGs (``scripts/imagenet_shaped.py``), the same
bytes in the three layouts."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import ROOT
from ddpipe import formats
from ddpipe.config import build_config
from ddpipe.dataindex import open_source
from ddpipe.errors import DataError, DatasetNotFoundError

sys.path.insert(0, str(ROOT / "scripts"))
from imagenet_shaped import write_imagenet_shaped  # noqa: E402

pytestmark = pytest.mark.fmnist
LAYOUTS = ("image-folder", "webdataset", "parquet")


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    """3 classes x 8 train + 4 val images; shards of 5 samples, so shards straddle classes."""
    out = tmp_path_factory.mktemp("shaped")
    write_imagenet_shaped(str(out), classes=3, train_per_class=8, val_per_class=4, shard_size=5, row_group_size=3)
    return out


def config(root, kind, store, **dataset):
    return build_config({"name": "s", "dataset": {"kind": kind, "root": str(root), "image_size": 64, "val_fraction": 0, **dataset},
                         "store": {"uri": str(store)}, "runtime": {"index_threads": 2}})


def copy(shaped, tmp_path, kind):
    shutil.copytree(shaped / kind, tmp_path / kind)
    return tmp_path / kind


def test_three_layouts_give_the_same_images_in_the_same_order(shaped, tmp_path):
    sources = {kind: open_source(config(shaped / kind, kind, tmp_path / "store")) for kind in LAYOUTS}
    first = sources["image-folder"]
    assert first.classes == ["n00000000", "n00000001", "n00000002"]
    assert first.train.class_counts().tolist() == [8, 8, 8] and first.test.class_counts().tolist() == [4, 4, 4]
    for kind, src in sources.items():
        assert src.classes == first.classes, kind
        for split in ("train", "test"):
            a, b = getattr(first, split), getattr(src, split)
            assert np.array_equal(a.labels, b.labels), kind
            assert all(a.read(i) == b.read(i) for i in range(len(a))), kind
        assert torch.equal(src.train.batch(range(24)), first.train.batch(range(24)))
    assert sources["webdataset"].train.source_id(5) == "shard-000001.tar/n00000000_000005.jpg"
    assert sources["parquet"].train.source_id(5) == "part-00001.parquet#0.0"
    img = first.train.image(0)
    assert img.shape[0] == 3 and 256 <= min(img.shape[1:]) <= 375


def test_the_index_is_built_once_and_resumes_shard_by_shard(shaped, tmp_path, monkeypatch):
    root = copy(shaped, tmp_path, "webdataset")
    cfg = config(root, "webdataset", tmp_path / "store")
    calls = []
    real = formats.index_shard
    monkeypatch.setattr("ddpipe.dataindex.index_shard", lambda *a: calls.append(a[1].path) or real(*a))
    fp = open_source(cfg).fingerprint
    assert len(calls) == 5 + 3  # 24 train samples in 5 tars, 12 val samples in 3
    [index] = list((tmp_path / "store" / "shared" / "datasets").iterdir())
    info = json.loads((index / "index.json").read_text())
    assert info["splits"]["train"]["rows"] == 24 and info["classes"][2] == "n00000002"
    rows = pq.read_table(index / "train.parquet")
    assert rows.schema.equals(formats.INDEX_SCHEMA) and rows.column("length").to_pylist()[0] > 10_000

    calls.clear()
    assert open_source(cfg).fingerprint == fp and calls == []  # read, not listed again

    (index / "index.json").unlink()  # an interrupted indexing: parts done, no index.json
    (index / "parts" / "train" / "shard-000003.tar.parquet").unlink()
    assert open_source(cfg).fingerprint == fp and calls == ["train/shard-000003.tar"]


def test_a_changed_or_gone_shard_is_refused_by_name(shaped, tmp_path):
    root = copy(shaped, tmp_path, "parquet")
    cfg = config(root, "parquet", tmp_path / "store")
    src = open_source(cfg)
    shard = root / "train" / "part-00002.parquet"
    shard.rename(tmp_path / "away.parquet")
    with pytest.raises(DataError, match="part-00002.parquet is listed in the dataset index but is gone"):
        open_source(cfg)
    with pytest.raises(DataError, match="part-00002.parquet is listed in the dataset index but is gone"):
        src.train.read(int(src.train.class_indices(1)[3]))  # the run that had it open
    (tmp_path / "away.parquet").rename(shard)
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 4), shard)
    with pytest.raises(DataError, match="part-00002.parquet changed after the source was indexed.*delete"):
        open_source(cfg)


def test_loader_workers_and_reduced_decoding(shaped, tmp_path):
    src = open_source(config(shaped / "webdataset", "webdataset", tmp_path / "store"))
    runtime = build_config({"name": "r", "runtime": {"loader_workers": 2}}).runtime
    order = np.arange(24)[::-1]
    pairs = list(src.train.batches(order, 7, runtime))
    assert [len(x) for x, _ in pairs] == [7, 7, 7, 3]
    assert torch.equal(torch.cat([x for x, _ in pairs]), src.train.batch(order))
    assert torch.equal(torch.cat([y for _, y in pairs]), torch.from_numpy(src.train.labels[order]))
    # A crop of a 112 px box to 28 px decodes the JPEG at a quarter size: near the full decode, not equal.
    box = torch.tensor([[20, 30, 112, 112]])
    boxes, crops = src.train.crops(0, lambda h, w: box, 28)
    full = torch.nn.functional.interpolate(src.train.image(0)[None, :, 20:132, 30:142].float(), size=28,
                                           mode="area")
    diff = (crops.float() - full).abs().mean()
    assert torch.equal(boxes, box) and 0 < diff < 6


def test_crops_reaching_the_edge_of_a_dct_reduced_decode():
    """DCT scaling rounds each side up (489 x 358 at 1/2 is 245 x 179): a box to the bottom edge must still fit.
    Pillow's crops from a reduced decode stay close to crops cut from the full-size tensor."""
    from ddpipe.augment import crop_resize
    from ddpipe.decode import decode, decode_crops, reduction

    yy, xx = np.mgrid[0:358, 0:489]
    rgb = np.stack([(xx * 255 // 488), (yy * 255 // 357), ((xx + yy) % 256)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    boxes = torch.tensor([[0, 48, 358, 358], [0, 0, 358, 489], [100, 200, 250, 280]])
    assert reduction(boxes, 112) == 2
    got_boxes, crops = decode_crops(buf.getvalue(), 3, "edge.jpg", lambda h, w: boxes, 112)
    assert torch.equal(got_boxes, boxes) and crops.shape == (3, 3, 112, 112) and crops.dtype == torch.uint8
    full, _ = decode(buf.getvalue(), 3, "edge.jpg")
    ref = crop_resize(full[None].float(), boxes, 112, torch.zeros(3, dtype=torch.int64))
    assert (crops.float() - ref).abs().mean() < 4


def test_loader_worker_errors_arrive_as_one_line(shaped, tmp_path):
    root = copy(shaped, tmp_path, "image-folder")
    bad = root / "train" / "n00000001" / "n00000001_000002.JPEG"
    bad.write_bytes(bad.read_bytes()[:5000])  # a truncated JPEG
    src = open_source(config(root, "image-folder", tmp_path / "store"))
    runtime = build_config({"name": "r", "runtime": {"loader_workers": 2}}).runtime
    with pytest.raises(DataError) as e:
        list(src.train.batches(np.arange(24), 8, runtime))
    assert str(e.value).startswith("cannot decode image ") and "n00000001_000002.JPEG" in str(e.value)
    assert "\n" not in str(e.value)


def test_loader_workers_do_not_run_the_parents_exit_hooks(shaped, tmp_path):
    """Prefect registers ``threading`` exit hooks that fail in a forked child: a loader worker ran them on exit
    and died with exit code 1 under the Prefect engine. A hook registered here would leave a file per worker."""
    import os
    import threading

    src = open_source(config(shaped / "webdataset", "webdataset", tmp_path / "store"))
    runtime = build_config({"name": "r", "runtime": {"loader_workers": 2}}).runtime
    parent = os.getpid()

    def hook():
        if os.getpid() != parent:
            (tmp_path / f"hook-ran-in-{os.getpid()}").touch()

    threading._register_atexit(hook)
    try:
        assert sum(len(x) for x, _ in src.train.batches(np.arange(24), 5, runtime)) == 24
    finally:
        threading._threading_atexits[:] = [c for c in threading._threading_atexits if c.func is not hook]
    assert not list(tmp_path.glob("hook-ran-in-*"))


def _write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(shaped, k=0) -> bytes:
    return sorted((shaped / "image-folder" / "train" / "n00000000").iterdir())[k].read_bytes()


@pytest.mark.parametrize("case", ["corrupt", "no-label", "label-out-of-range", "val-only-class"])
def test_bad_tar_shards_are_named(shaped, tmp_path, case):
    root = copy(shaped, tmp_path, "webdataset")
    good = {f"a{k}.jpg": _jpeg(shaped, k) for k in range(3)} | {f"a{k}.cls": b"0" for k in range(3)}
    if case == "corrupt":
        _write_tar(root / "train" / "shard-000009.tar", {**good, "a1.jpg": _jpeg(shaped, 1)[:5000]})
        src = open_source(config(root, "webdataset", tmp_path / "store"))
        i = [src.train.source_id(k) for k in range(len(src.train))].index("shard-000009.tar/a1.jpg")
        with pytest.raises(DataError, match=r"cannot decode image .*shard-000009.tar:a1.jpg \(OSError"):
            src.train.image(i)
        return
    if case == "no-label":
        bad, match = {k: v for k, v in good.items() if k != "a2.cls"}, r"tar member .*shard-000009.tar:a2.jpg has no label"
    elif case == "label-out-of-range":
        bad, match = {**good, "a2.cls": b"7"}, r"shard-000009.tar: sample a2 has label 7, outside the 3 classes"
    else:
        (root / "classes.txt").write_text("n00000000\nn00000001\nn00000002\nn00000003\n")
        _write_tar(root / "val" / "shard-000009.tar", {"v.jpg": _jpeg(shaped), "v.cls": b"3"})
        with pytest.raises(DataError, match="class 'n00000003' is in the val split but has no images in the train"):
            open_source(config(root, "webdataset", tmp_path / "store"))
        return
    _write_tar(root / "train" / "shard-000009.tar", bad)
    with pytest.raises(DataError, match=match):
        open_source(config(root, "webdataset", tmp_path / "store"))


@pytest.mark.parametrize("case", ["no-image-column", "label-out-of-range", "binary-column"])
def test_parquet_shards(shaped, tmp_path, case):
    root = copy(shaped, tmp_path, "parquet")
    shard = root / "train" / "part-00004.parquet"
    table = pq.read_table(shard)
    if case == "no-image-column":
        pq.write_table(table.rename_columns(["picture", "label"]), shard)
        match = r"part-00004.parquet has no image column 'image' \(binary, or struct<bytes, path>\); columns: picture"
    elif case == "label-out-of-range":
        pq.write_table(table.set_column(1, "label", pa.array([0, 1, 2, 3], pa.int64())), shard)
        match = r"part-00004.parquet row group 0 row 3 has label 3, outside the 3 classes"
    else:  # a plain binary image column, names from classes.txt: reads the same bytes
        flat = table.set_column(0, "image", table.column("image").combine_chunks().field("bytes"))
        pq.write_table(flat, shard, row_group_size=2)
        src = open_source(config(root, "parquet", tmp_path / "store"))
        assert src.train.read(len(src.train) - 1) == table.column("image")[3].as_py()["bytes"]
        return
    with pytest.raises(DataError, match=match):
        open_source(config(root, "parquet", tmp_path / "store"))


def test_image_modes_decode_to_rgb_the_right_way_up(tmp_path):
    from ddpipe.decode import decode

    base = Image.new("RGB", (40, 20), (200, 30, 30))
    base.paste((10, 10, 220), (0, 0, 10, 20))  # a blue band on the left
    out = {}
    cmyk = io.BytesIO()
    base.convert("CMYK").save(cmyk, "JPEG", quality=95)
    out["cmyk"] = cmyk.getvalue()
    gray = io.BytesIO()
    base.convert("L").save(gray, "JPEG", quality=95)
    out["gray"] = gray.getvalue()
    rgba = base.convert("RGBA")
    rgba.putalpha(_alpha())
    png = io.BytesIO()
    rgba.save(png, "PNG")
    out["alpha"] = png.getvalue()
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored as is, shown rotated 90 degrees clockwise
    base.save(rotated, "JPEG", quality=95, exif=exif)
    out["exif"] = rotated.getvalue()
    imgs = {k: decode(v, 3, k)[0] for k, v in out.items()}
    assert imgs["cmyk"].shape == (3, 20, 40) and abs(int(imgs["cmyk"][0, 10, 30]) - 200) < 12
    assert imgs["gray"].shape == (3, 20, 40) and torch.equal(imgs["gray"][0], imgs["gray"][2])
    assert imgs["alpha"][:, 10, 35].tolist() == [255, 255, 255]  # transparent: white
    assert imgs["alpha"][:, 10, 15].tolist() == [200, 30, 30]  # opaque: the colour
    assert imgs["exif"].shape == (3, 40, 20)  # portrait, band on top after the rotation
    assert imgs["exif"][2, 2, 10] > 150 and imgs["exif"][0, 35, 10] > 150


def _alpha():
    a = Image.new("L", (40, 20), 255)
    a.paste(0, (30, 0, 40, 20))  # the right quarter transparent
    return a


def test_index_key_and_errors_name_the_source(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"dataset folder .*nowhere/train not found"):
        open_source(config(tmp_path / "nowhere", "webdataset", tmp_path / "store"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DataError, match=r"empty/train has no tar shards"):
        open_source(config(tmp_path / "empty", "webdataset", tmp_path / "store"))


def test_indexing_as_groups_of_shards_as_the_flow_runs_it(shaped, tmp_path, monkeypatch):
    from ddpipe.dataindex import index_group, index_groups

    cfg = build_config({"name": "s", "dataset": {"kind": "parquet", "root": str(shaped / "parquet"), "image_size": 64},
                        "store": {"uri": str(tmp_path / "store")}, "orchestration": {"max_shards_per_stage": 3}})
    calls = []
    real = formats.index_shard
    monkeypatch.setattr("ddpipe.dataindex.index_shard", lambda *a: calls.append(a[1].path) or real(*a))
    groups = index_groups(cfg)
    assert len(groups) == 3 and sum(len(g) for g in groups) == 5 + 3
    assert sum(index_group(cfg, g) for g in groups) == 36 and len(calls) == 8
    assert sum(index_group(cfg, g) for g in groups) == 36 and len(calls) == 8  # a retried task: parts reused
    src = open_source(cfg)  # joins the parts the groups wrote
    assert len(calls) == 8 and len(src.train) + len(src.val) == 24 and index_groups(cfg) == []


def test_device_decode_path_matches_the_cpu_loader(shaped, tmp_path):
    """The nvJPEG path of ``batches`` (runtime.gpu_decode on CUDA), run here through torchvision's CPU decoder: the
    same images up to the resize's rounding."""
    src = open_source(config(shaped / "webdataset", "webdataset", tmp_path / "store"))
    datas = [src.train.read(i) for i in range(6)]
    on_device = src.train._device_batch(datas, np.arange(6), torch.device("cpu"))
    assert on_device.shape == (6, 3, 64, 64) and on_device.dtype == torch.uint8
    assert (on_device.float() - src.train.batch(range(6)).float()).abs().mean() < 4


def test_sixteen_bit_and_palette_images_are_scaled_not_clipped():
    from ddpipe.decode import decode

    ramp = (np.arange(40 * 20).reshape(20, 40) * 80).astype(np.uint16)  # 0 .. 63920 over the image
    files = {}
    for kind in ("PNG", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(ramp).save(buf, kind)  # 16-bit greyscale (mode I;16)
        files[f"16-bit {kind}"] = buf.getvalue()
    palette = Image.new("RGB", (40, 20), (200, 30, 30))
    palette.paste((10, 10, 220), (0, 0, 10, 20))
    buf = io.BytesIO()
    palette.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(buf, "PNG")
    files["palette"] = buf.getvalue()
    buf = io.BytesIO()
    indexed = palette.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    indexed.save(buf, "GIF", transparency=indexed.getpixel((5, 10)))  # the blue band's entry is transparent
    files["palette+transparency"] = buf.getvalue()
    assert Image.open(io.BytesIO(files["16-bit PNG"])).mode.startswith("I")
    expected = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    for kind in ("16-bit PNG", "16-bit TIFF"):
        grey = decode(files[kind], 1, kind)[0][0]
        assert (grey.int() - expected.int()).abs().max() <= 1, kind  # scaled: the whole range survives
        assert len(grey.unique()) > 200 and abs(grey.float().mean() - expected.float().mean()) < 0.5
        assert torch.equal(decode(files[kind], 3, kind)[0][1], grey)
    rgb = decode(files["palette"], 3, "palette")[0]
    assert rgb[:, 10, 30].tolist() == [200, 30, 30] and rgb[:, 10, 5].tolist() == [10, 10, 220]
    gif = decode(files["palette+transparency"], 3, "gif")[0]
    assert gif[:, 10, 5].tolist() == [255, 255, 255] and gif[:, 10, 30].tolist() == [200, 30, 30]  # over white
