
import pytest

from ddpipe.config import RunConfig, build_config, config_reference, load_config
from ddpipe.errors import ConfigError

from conftest import CONFIGS, ROOT, SMOKE, run_cli


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates(path):
    # ImageNet presets validate although that data is absent here.
    cfg = load_config(path)
    assert cfg.run_name.startswith(cfg.name + "-")


def test_fashion_mnist_presets_cover_ipc_1_10_50():
    ipcs = {load_config(CONFIGS / f"fashion-mnist-rded-ipc{i}.yaml").method.ipc for i in (1, 10, 50)}
    assert ipcs == {1, 10, 50}


def test_imagenet_presets_use_paper_settings():
    for name, classes_hint in (("imagenet1k-rded-ipc10.yaml", "imagenet"), ("imagenet21k-p-rded-ipc10.yaml", "21k")):
        cfg = load_config(CONFIGS / name)
        assert cfg.dataset.kind == "image-folder" and classes_hint in cfg.dataset.root.lower()
        assert cfg.image_size == 224 and cfg.factor == 2  # N = 4 patches of 112 px
        assert cfg.method.candidates_per_class == 300 and cfg.method.crops_per_image == 5


def test_overrides_with_dotted_keys():
    cfg = load_config(SMOKE, ["method.ipc=5", "evaluation.seeds=[3, 4]", "labels.top_k=null"])
    assert cfg.method.ipc == 5 and cfg.evaluation.seeds == (3, 4) and cfg.labels.top_k is None


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("method.ipc=0", "method.ipc"),
        ("method.ipcc=3", "unknown config field 'method.ipcc'"),
        ("evaluation.regimes=[hard, fuzzy]", "evaluation.regimes"),
        ("dataset.image_size=32", "dataset.image_size must be 28"),
        ("teacher.augment.crop_scale=[0.9, 0.2]", "teacher.augment.crop_scale"),
        ("method.selection.window=9", "window (9) must not exceed checkpoints (8)"),
        ("method.selection.last=4", "last (4) exceeds the 3 windows of 6 among 8 checkpoints"),
        ("method.selection.el2n_checkpoint=9", "el2n_checkpoint (9) exceeds checkpoints (8)"),
    ],
)
def test_invalid_fields_give_one_line_errors_naming_the_field(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


def test_run_hash_ignores_store_orchestration_runtime_but_not_results():
    base = load_config(SMOKE)
    same = load_config(SMOKE, ["store.uri=s3://b/x", "orchestration.max_workers=4", "runtime.device=cpu"])
    other = load_config(SMOKE, ["method.ipc=3"])
    assert base.run_name == same.run_name
    assert base.run_name != other.run_name


def test_derived_defaults():
    cfg = build_config({"name": "x"})
    assert (cfg.image_size, cfg.channels, cfg.factor) == (28, 1, 1)
    big = build_config({"name": "y", "dataset": {"kind": "image-folder", "root": "/d", "image_size": 224}})
    assert (big.channels, big.factor, len(big.normalization[0])) == (3, 2, 3)
    with pytest.raises(ConfigError, match="image_size is required"):
        build_config({"name": "z", "dataset": {"kind": "image-folder", "root": "/d"}})


def test_config_reference_doc_is_current():
    doc = (ROOT / "docs" / "config.md").read_text()
    assert doc == config_reference(), "regenerate with: python -m ddpipe.config > docs/config.md"
    for field in RunConfig.model_fields:
        assert f"`{field}" in doc


def test_cli_rejects_invalid_field_with_one_line():
    proc = run_cli("validate", str(SMOKE), "--set", "method.ipc=-3")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpipe: error:") and "method.ipc" in lines[0]
