"""The deployment catalog, the generated prefect.yaml and the Kubernetes GPU job template, without a server
(tests/test_ui.py registers them on a real one)."""

import re

import yaml
from prefect.flows import load_flow_from_entrypoint

from ddpipe.config import build_config, load_config
from ddpipe.deployments.catalog import CATALOG, ENTRYPOINTS, K8S_POOL, ROOT, k8s_template, prefect_yaml


def test_prefect_yaml_is_generated_from_the_catalog():
    assert (ROOT / "deployments" / "prefect.yaml").read_text() == prefect_yaml(), \
        "regenerate: python -m ddpipe.deployments.catalog > deployments/prefect.yaml"


def test_every_entrypoint_loads_its_flow():
    for name, entrypoint in ENTRYPOINTS.items():
        assert load_flow_from_entrypoint(str(ROOT / entrypoint)).name == name


def test_deployment_parameters_are_the_presets_configs():
    spec = yaml.safe_load(prefect_yaml())
    assert [d["name"] for d in spec["deployments"]] == [e.name for e in CATALOG]
    for e, d in zip(CATALOG, spec["deployments"]):
        if e.flow == "evaluate":
            assert (ROOT / d["parameters"]["matrix"]).is_file()
            continue
        # only the non-default fields are written; validated, they give back the preset exactly
        assert build_config(d["parameters"]["config"]) == load_config(ROOT / e.config, e.overrides)
    assert any(d.get("schedules") and d["work_pool"]["name"] == "ddpipe-local" for d in spec["deployments"])


def test_kubernetes_template_declares_every_variable_it_uses_and_requests_gpus():
    template = k8s_template()
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"{{\s*(\w+)\s*}}", str(template["job_configuration"])))
    assert used <= declared and {"gpu_limit", "node_selector", "tolerations"} <= used
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    for e in CATALOG:
        if e.pool == K8S_POOL:
            assert set(e.job_variables) <= declared and e.job_variables["gpu_limit"] >= 1
            cfg = load_config(ROOT / e.config, e.overrides)
            assert cfg.store.uri.startswith("s3://") and cfg.runtime.device == "cuda"
