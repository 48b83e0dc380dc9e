"""The registries are the only lists of names: the config accepts exactly their keys, and every entry works."""

from __future__ import annotations

import typing

import pytest

from ddpipe.config import MethodConfig, build_config
from ddpipe.errors import ConfigError
from ddpipe.methods import METHODS, Recovery, Selection
from ddpipe.models import MODELS, ModelSpec  # every model builds: tests/test_models.py
from ddpipe.pipeline import Stage


def test_the_config_accepts_exactly_the_registered_methods_and_models():
    assert typing.get_args(MethodConfig.model_fields["name"].annotation) == tuple(METHODS)
    assert typing.get_args(ModelSpec.model_fields["name"].annotation) == tuple(MODELS)
    for bad in ("method.name=rdedx", "teacher.model.name=resnet19"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            build_config({"name": "x"}, [bad])


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_makes_its_stages_and_ends_with_synthesis(name):
    method = METHODS[name]
    stages = method.stages()
    assert stages and all(isinstance(s, Stage) for s in stages)
    assert stages[-1].name == "synthesis"
    names = [s.name for s in stages]
    assert len(set(names)) == len(names)
    for i, stage in enumerate(stages):  # every input is made before the stage runs
        assert set(stage.inputs) <= {"dataset", "teacher", *names[:i]}, (name, stage.name)
    cfg = build_config({"name": "x", "method": {"name": name}, "teacher": {"model": {"norm": "batch"}}})
    assert (cfg.method.recovers, cfg.method.stitches) == (method.recovers, method.stitches)
    assert method.stages(cfg) == stages  # the default settings' stages


def test_a_refine_run_with_conv_statistics_collects_the_moments_first():
    cfg = build_config({"name": "x", "method": {"name": "refine", "refine": {"conv_statistics": True}}})
    assert [s.name for s in METHODS["refine"].stages(cfg)] == ["scoring", "moments", "statistics", "refinement",
                                                              "synthesis"]


def test_methods_of_one_family_differ_in_data_only():
    families: dict[str, list] = {}
    for name, m in METHODS.items():
        families.setdefault(m.family, []).append(m)
    for family, members in families.items():
        kinds = {type(m.variant) for m in members}
        assert len(kinds) == 1, family  # one variant record per family
        if len(members) > 1:
            assert len({m.variant for m in members}) == len(members), family  # distinct variants, not names
    assert {type(m.variant) for m in METHODS.values()} == {type(None), Recovery, Selection}


def test_every_selection_names_a_score_the_selection_family_has():
    from ddpipe.methods.selection.select import DYNAMICS_SCORES, FEATURE_SCORES

    scores = {"random", *DYNAMICS_SCORES, *FEATURE_SCORES}
    for name, m in METHODS.items():
        if isinstance(m.variant, Selection):
            assert m.variant.score in scores, name
            assert not m.variant.pool or m.variant.score in DYNAMICS_SCORES, name  # a pool ranked by dynamics


def test_shared_stages_import_no_method_module():
    """The stages every run has reach the method registry (through the config) but no family's code."""
    from ddpipe.codehash import INSTALLED
    from ddpipe.stages import stages_for

    shared = [s for s in stages_for(build_config({"name": "x"})) if s.name not in ("scoring", "synthesis")]
    assert [s.name for s in shared] == ["dataset", "teacher", "random_subset", "labels", "evaluation"]
    for stage in shared:
        reached = INSTALLED.closure([stage.run.__module__])
        assert [m for m in reached if m.startswith("ddpipe.methods.")] == [], stage.name
