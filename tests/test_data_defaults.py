"""Defaults that fit the data: a newcomer's short config on a small image folder unlike Fashion-MNIST (32 px,
150 images per class) gives an RDED run level with its random subset; the defaults of before (ImageNet's crop
scale at factor 1) fell far below it; the table flags a set that does."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from conftest import ROOT, run_cli
from ddpipe.config import build_config
from ddpipe.errors import ConfigError
from ddpipe.report import far_below_random

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from small_folder import write_small_folder  # noqa: E402
from small_folder_defaults import newcomer_config  # noqa: E402


@pytest.mark.parametrize("size, factor, scale, crops", [
    (28, None, (1.0, 1.0), 1), (32, None, (1.0, 1.0), 1), (64, None, (1.0, 1.0), 1), (64, 2, (0.08, 1.0), 5),
    (96, None, (0.08, 1.0), 5), (224, None, (0.08, 1.0), 5)])
def test_rded_crop_defaults_follow_the_image_size(size, factor, scale, crops):
    dataset = {"kind": "image-folder", "root": "/data", "image_size": size}
    cfg = build_config({"name": "x", "dataset": dataset, "method": {"name": "rded", "factor": factor}})
    assert (cfg.method.crop_scale, cfg.method.crops_per_image) == (scale, crops)
    assert cfg.method.candidates_per_class == (30 if crops == 1 else 300)  # ipc 10: 3 x ipc whole images
    # set in the config: kept
    cfg = build_config({"name": "x", "dataset": dataset, "method": {"crop_scale": [0.5, 1.0], "crops_per_image": 3}})
    assert (cfg.method.crop_scale, cfg.method.crops_per_image) == ((0.5, 1.0), 3)
    # methods that score no crops are left alone
    assert build_config({"name": "x", "dataset": dataset, "method": {"name": "random"}}).method.crop_scale == (0.08, 1.0)


def test_dataset_flip_false_turns_every_flip_off_and_refuses_one_turned_on():
    cfg = build_config({"name": "x", "dataset": {"flip": False}, "method": {"name": "sre2l"},
                        "teacher": {"model": {"norm": "batch"}}})
    assert not cfg.teacher.augment.flip and not cfg.evaluation.augment.flip and not cfg.method.recovery.flip
    assert cfg.teacher.augment.crop_scale == (0.6, 1.0)  # the rest of each section's default is kept
    assert cfg.evaluation.augment.cutmix == 1.0
    on = build_config({"name": "x"})
    assert on.teacher.augment.flip and on.evaluation.augment.flip and on.method.recovery.flip
    with pytest.raises(ConfigError, match="evaluation.augment.flip is true but dataset.flip is false"):
        build_config({"name": "x", "dataset": {"flip": False}, "evaluation": {"augment": {"flip": True}}})
    # DSA's own flip op goes too: it draws from the other five
    dsa = build_config({"name": "x", "dataset": {"flip": False}, "evaluation": {"augment": {"dsa": True}}})
    assert dsa.evaluation.augment.dsa_ops == ("color", "crop", "cutout", "scale", "rotate")
    assert "flip" in on.evaluation.augment.dsa_ops
    with pytest.raises(ConfigError, match="evaluation.augment.dsa_ops has flip but dataset.flip is false"):
        build_config({"name": "x", "dataset": {"flip": False}, "evaluation": {"augment": {"dsa_ops": ["flip"]}}})
    from ddpipe.augment import Augmenter, generator

    x = torch.arange(2 * 8.0).view(1, 1, 2, 8).repeat(16, 1, 1, 1)  # only a flip gives its exact mirror

    def mirrored(augment) -> int:
        aug = Augmenter(augment.model_copy(update={"crop_scale": None, "cutmix": 0.0}), generator(0))
        return sum(int(torch.equal(v, x[0].flip(-1))) for _ in range(40) for v in aug.views(x))

    assert mirrored(on.evaluation.augment.model_copy(update={"dsa": True})) > 0
    assert mirrored(dsa.evaluation.augment) == 0


def test_far_below_random_flags_only_gaps_over_three_points():
    def regime(d, r):
        return {"improvement_over_random": None if d is None else d - r}

    flags = far_below_random({"hard": regime(0.552, 0.906), "soft": regime(0.90, 0.92), "soft_kd": regime(None, 0.9)})
    assert len(flags) == 1 and "35.4 points below its random subset in the hard regime" in flags[0]
    from ddpipe.report import results_table

    def entry(d, r):
        return {"distilled": {"mean": d, "std": 0.0}, "random": {"mean": r, "std": 0.0}, "improvement_over_random": d - r}

    report = {"method": "rded", "dataset": "image-folder", "ipc": 10, "teacher": {"val_accuracy": 0.9},
              "labels": {"bytes": 1}, "regimes": {"hard": entry(0.552, 0.906)}, "warnings": flags}
    assert results_table(report).splitlines()[-1] == f"warning: {flags[0]}"  # what the CLI prints


@pytest.mark.slow
@pytest.mark.fmnist
def test_newcomer_config_on_a_small_folder_is_level_with_random(tmp_path):
    data = write_small_folder(tmp_path / "data", size=32, classes=10, train_per_class=150, val_per_class=50)
    config = tmp_path / "newcomer.yaml"
    config.write_text(yaml.safe_dump(newcomer_config(data)))
    quick = ["teacher.epochs=5", "evaluation.epochs=60", "evaluation.seeds=[0, 1]", "evaluation.regimes=[hard]",
             "evaluation.baseline_draws=2"]

    def run(*overrides):
        args = [x for o in (*quick, *overrides) for x in ("--set", o)]
        proc = run_cli("run", str(config), "--store", str(tmp_path / "runs"), "--engine", "plain", "--no-progress",
                       *args, timeout=1800)  # about 6 min alone; 10 min was too short on 2 busy cores
        assert proc.returncode == 0, proc.stderr[-3000:]
        uri = next(line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("report: "))
        report = json.loads(open(uri).read())
        return proc.stdout, report["regimes"]["hard"], report["warnings"]

    out, hard, warnings = run()
    assert hard["comparison"]["verdict"] in ("level", "above"), out  # 2 seeds against 2 draws x 2 seeds
    assert hard["improvement_over_random"] > -0.03, out
    assert warnings == [] and "warning:" not in out
    # The defaults of before (benchmarks/small_folder_defaults.py --old-defaults) fell 35 points below random
    # at full budget; docs/benchmarks.md "Reliability" has the sweep. Not rerun here, to keep the suite short.
