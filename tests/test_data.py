import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ddpipe.config import build_config
from ddpipe.data import FASHION_MNIST_CLASSES, find_fashion_mnist
from ddpipe.dataindex import open_source
from ddpipe.errors import DataError, DatasetNotFoundError


def fm_config(**dataset):
    return build_config({"name": "t", "dataset": {"kind": "fashion-mnist", **dataset}})


@pytest.mark.fmnist
def test_fashion_mnist_from_debian_path():
    src = open_source(fm_config())
    assert src.classes == list(FASHION_MNIST_CLASSES)
    assert (len(src.train), len(src.val), len(src.test)) == (54000, 6000, 10000)  # val_fraction 0.1 by default
    assert src.train.class_counts().tolist() == [5400] * 10 and src.val.class_counts().tolist() == [600] * 10
    idx = src.train.class_indices(3)
    assert (src.train.labels[idx] == 3).all() and len(idx) == 5400
    img = src.train.image(int(idx[0]))
    assert img.dtype == torch.uint8 and img.shape == (1, 28, 28) and img.max() > 0


@pytest.mark.fmnist
def test_fashion_mnist_from_torchvision_root(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in find_fashion_mnist(None).iterdir():
        if f.name.endswith(".gz"):
            shutil.copy(f, raw / f.name)
    a = open_source(fm_config(root=str(tmp_path), train_per_class=5, test_per_class=5))
    b = open_source(fm_config(train_per_class=5, test_per_class=5))
    assert a.fingerprint == b.fingerprint
    assert torch.equal(a.train.batch(range(len(a.train))), b.train.batch(range(len(b.train))))


@pytest.mark.fmnist
def test_slices_keep_the_first_images_of_each_class_and_change_the_fingerprint():
    full = open_source(fm_config(val_fraction=0))
    small = open_source(fm_config(train_per_class=7, test_per_class=3, val_fraction=0))
    assert full.val is None
    assert small.train.class_counts().tolist() == [7] * 10 and len(small.test) == 30
    for c in range(10):
        first = full.train.class_indices(c)[:7]
        assert torch.equal(small.train.batch(small.train.class_indices(c)), full.train.batch(first))
    assert small.fingerprint != full.fingerprint


@pytest.mark.fmnist
def test_the_validation_split_is_held_out_of_training_fixed_and_per_class():
    whole = open_source(fm_config(train_per_class=50, val_fraction=0))
    src = open_source(fm_config(train_per_class=50))  # 10 % of 50: 5 per class
    assert src.val.class_counts().tolist() == [5] * 10 and src.train.class_counts().tolist() == [45] * 10

    def ids(split):
        return {split.source_id(i) for i in range(len(split))}

    train, val = ids(src.train), ids(src.val)
    assert not train & val and train | val == ids(whole.train)  # disjoint, and together the training split
    for i in range(len(src.val)):  # the same images and labels as in the training file
        j = int(src.val.source_id(i).split("/")[1])
        assert torch.equal(src.val.image(i), whole.train.image(j)) and src.val.labels[i] == whole.train.labels[j]
    again = open_source(fm_config(train_per_class=50, val_per_class=5))
    assert ids(again.val) == val and again.fingerprint == src.fingerprint  # fixed: the same slice every time
    other = open_source(fm_config(train_per_class=50, val_per_class=3))
    assert other.val.class_counts().tolist() == [3] * 10 and other.fingerprint != src.fingerprint
    positions = [int(v.split("/")[1]) for v in ids(src.val)]  # not the first images of each class: drawn
    assert sorted(positions) != sorted(np.concatenate([whole.train.class_indices(c)[:5] for c in range(10)]).tolist())


def test_missing_fashion_mnist_names_the_install_hint(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        open_source(fm_config(root=str(tmp_path / "nowhere")))
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "dataset.root" in str(e.value)


@pytest.mark.fmnist
def test_truncated_idx_file_is_named(tmp_path):
    src = find_fashion_mnist(None)
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    import gzip
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes())[:-10])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*truncated"):
        open_source(fm_config(root=str(tmp_path)))


def write_image_folder(root, per_class=6, classes=3, size=28, rgb=False):
    """Real Fashion-MNIST images written in the ImageNet layout: <root>/{train,val}/<class>/*.png."""
    src = open_source(fm_config())
    for split, split_src, n in (("train", src.train, per_class), ("val", src.test, 2)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for k, i in enumerate(split_src.class_indices(c)[:n]):
                arr = split_src.image(int(i))[0].numpy()
                im = Image.fromarray(arr).resize((size + 4 * k, size), Image.BILINEAR)  # varied native sizes
                (im.convert("RGB") if rgb else im).save(d / f"img{k:03d}.png")
    return root


def folder_config(root, **extra):
    """An image-folder config on ``root``; its store (and so the dataset index) next to the data."""
    return build_config({"name": "f", "dataset": {"kind": "image-folder", "root": str(root), "image_size": 28,
                                                    "channels": 1, "val_fraction": 0, **extra},
                         "store": {"uri": str(root.parent / "store")}})


@pytest.mark.fmnist
def test_image_folder_lists_classes_and_loads_images(tmp_path):
    root = write_image_folder(tmp_path / "data")
    src = open_source(folder_config(root))
    assert src.classes == ["n00000000", "n00000001", "n00000002"]
    assert src.train.class_counts().tolist() == [6, 6, 6] and len(src.test) == 6
    assert src.train.source_id(1) == "n00000000/img001.png"
    native = src.train.image(1)
    assert native.shape == (1, 28, 32)  # native size kept
    batch = src.train.batch([0, 1, 7])
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == torch.uint8
    held = open_source(folder_config(root, val_per_class=2))  # the validation split of an indexed source
    train, val = ({s.source_id(i) for i in range(len(s))} for s in (held.train, held.val))
    assert len(train) == 12 and len(val) == 6 and not train & val
    assert train | val == {src.train.source_id(i) for i in range(len(src.train))}
    k = next(i for i in range(len(src.train)) if src.train.source_id(i) == held.val.source_id(0))
    assert torch.equal(held.val.image(0), src.train.image(k)) and held.val.labels[0] == src.train.labels[k]


@pytest.mark.fmnist
def test_image_folder_changed_after_indexing_is_named_and_a_new_index_follows_content(tmp_path):
    root = write_image_folder(tmp_path / "data")
    src = open_source(folder_config(root))
    fp = src.fingerprint
    changed = root / "train" / "n00000001" / "img002.png"
    Image.fromarray(np.zeros((28, 40), dtype=np.uint8)).save(changed)
    reopened = open_source(folder_config(root))  # the index is read, not the folders: same fingerprint
    assert reopened.fingerprint == fp
    i = [reopened.train.source_id(k) for k in range(len(reopened.train))].index("n00000001/img002.png")
    with pytest.raises(DataError, match="img002.png changed after it was indexed"):
        reopened.train.image(i)
    shutil.rmtree(tmp_path / "store" / "shared" / "datasets")  # what the error says to do
    assert open_source(folder_config(root)).fingerprint != fp


@pytest.mark.fmnist
def test_corrupt_image_file_is_named(tmp_path):
    root = write_image_folder(tmp_path / "data")
    bad = root / "train" / "n00000002" / "img003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    src = open_source(folder_config(root))
    i = [src.train.source_id(k) for k in range(len(src.train))].index("n00000002/img003.png")
    with pytest.raises(DataError) as e:
        src.train.image(i)
    assert str(bad) in str(e.value)


@pytest.mark.fmnist
def test_image_folder_missing_split_is_a_clear_error(tmp_path):
    root = write_image_folder(tmp_path / "data")
    shutil.rmtree(root / "val")
    with pytest.raises(DatasetNotFoundError, match="dataset folder .*/val not found"):
        open_source(folder_config(root))


@pytest.mark.fmnist
def test_a_class_too_small_for_the_validation_split_is_a_report_warning(tmp_path):
    import pyarrow as pa

    from ddpipe.pipeline import context_for
    from ddpipe.report import validation_gaps

    root = write_image_folder(tmp_path / "data", per_class=6)
    for extra in sorted((root / "train" / "n00000001").iterdir())[1:]:
        extra.unlink()  # class 1 keeps one training image: none left for validation
    cfg = folder_config(root, val_fraction=0.2)
    src = context_for(cfg).source
    table = pa.table({"class_name": src.classes, "train_images": src.train.class_counts().tolist(),
                      "val_images": src.val_counts().tolist()})
    assert table.column("val_images").to_pylist() == [1, 0, 1]
    (warning,) = validation_gaps(table, cfg.has_val_split)
    assert "no images of 1 of the 3 classes ('n00000001'" in warning
    assert validation_gaps(table, False) == []
