import pytest
import torch

from ddpipe.errors import CheckpointError, ClassMapMismatchError
from ddpipe.teacher import checkpoint_bytes, load_teacher, read_checkpoint, train_teacher

CPU = torch.device("cpu")


@pytest.mark.fmnist
def test_teacher_learns_and_its_checkpoint_carries_class_map_and_accuracy(trained_teacher, session_dir):
    cfg, source, teacher = trained_teacher
    assert teacher.val_accuracy > 0.5  # 10 classes: chance is 0.1
    payload = read_checkpoint((session_dir / "teacher.pt").read_bytes(), "teacher.pt")
    assert payload["classes"] == source.classes
    assert payload["val_accuracy"] == teacher.val_accuracy
    assert payload["dataset_fingerprint"] == source.fingerprint
    assert (payload["image_size"], payload["channels"]) == (28, 1)


@pytest.mark.fmnist
def test_refuses_a_teacher_for_another_class_map(trained_teacher, session_dir):
    cfg, source, _ = trained_teacher
    data = (session_dir / "teacher.pt").read_bytes()
    swapped = list(source.classes)
    swapped[2], swapped[4] = swapped[4], swapped[2]
    with pytest.raises(ClassMapMismatchError) as e:
        load_teacher(data, "teacher.pt", swapped, cfg.input_format, CPU, cfg.runtime)
    assert "class 2 is 'Pullover' in the checkpoint but 'Coat' in the data" in str(e.value)
    with pytest.raises(ClassMapMismatchError, match="10 classes in the checkpoint, 9 in the data"):
        load_teacher(data, "teacher.pt", source.classes[:9], cfg.input_format, CPU, cfg.runtime)


def test_unreadable_checkpoint_is_named():
    with pytest.raises(CheckpointError, match="broken.pt"):
        read_checkpoint(b"not a checkpoint", "broken.pt")


@pytest.mark.fmnist
def test_teacher_training_is_deterministic(cfg):
    from ddpipe.config import load_config
    from ddpipe.dataindex import open_source

    from conftest import SMOKE

    small = load_config(SMOKE, ["dataset.train_per_class=20", "teacher.epochs=1"])
    source = open_source(small)
    fmt = small.input_format

    def trained() -> bytes:
        model = train_teacher(small.teacher, small.teacher.model, fmt, source, small.seed, CPU, small.runtime)
        return checkpoint_bytes(model, fmt, source, small.teacher.model, 0.0)

    a, b = trained(), trained()
    assert a == b
