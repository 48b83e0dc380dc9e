from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

from ddpipe.config import load_config

from conftest import ROOT


def test_prefect_yaml_deployments_point_at_the_flow_and_valid_configs():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert spec["deployments"]
    for d in spec["deployments"]:
        path, name = d["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        assert flow.name == "distill" and (ROOT / path).is_file() and name == "distill"
        cfg = load_config(ROOT / d["parameters"]["config"], d["parameters"]["overrides"])
        assert cfg.run_name


def test_served_deployments_build():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve", ROOT / "deployments" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    deployments = module.build_deployments()
    assert {d.name for d in deployments} == set(module.PRESETS)
    for d in deployments:
        assert Path(ROOT / d.parameters["config"]).is_file()
