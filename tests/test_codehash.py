"""Cache keys follow the code: the code part of every key comes from the modules a stage imports.

The end-to-end checks edit a temporary copy of the package and compute real keys (every stage's shard key,
the shared teacher, denoiser and generated-pool keys) in a subprocess that imports that copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ddpipe
from ddpipe.codehash import Tree

from conftest import ROOT

PACKAGE = Path(ddpipe.__file__).resolve().parent

# For the package copy on PYTHONPATH: every key (each stage's shard key for its first shard, per method; the shared
# teacher, denoiser and generated-pool keys) before any edit, then after each edit in argv[2] (a JSON list of
# edits, each a list of [file, text]: text appended to the file, or the whole file when it is new), each edit
# undone before the next.
KEYS = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import ddpipe
    root = Path(ddpipe.__file__).parent
    assert str(root).startswith(sys.argv[1]), ddpipe.__file__
    from ddpipe import codehash
    from ddpipe.config import load_config
    from ddpipe.manifests import StageManifest
    from ddpipe.methods.diffusion.generation import generation_key
    from ddpipe.methods.diffusion.training import diffusion_key
    from ddpipe.pipeline import Context, shard_key
    from ddpipe.stages import stages_for
    from ddpipe.teacher import teacher_key

    contexts = {name: Context(load_config("configs/smoke.yaml", ["store.uri=memory://keys", *overrides]))
                for name, overrides in (("rded", []), ("el2n", ["method.name=el2n"]), ("gvbsm", ["method.name=gvbsm"]),
                                        ("diffusion", ["method.name=diffusion"]))}

    def keys():
        codehash.INSTALLED = codehash.Tree(root)  # read the files again: they changed since the last call
        codehash._installed_hash.cache_clear()
        out = {}
        for name, ctx in contexts.items():
            out[name] = {}
            for stage in stages_for(ctx.cfg):
                inputs = {i: StageManifest(stage=i, path="-", sha256="0" * 64, shards=1, files=1, bytes=1, rows=0)
                          for i in stage.inputs}
                out[name][stage.name] = shard_key(ctx, stage, stage.plan(ctx, 10)[0], inputs)
        ctx = contexts["diffusion"]
        group = stages_for(ctx.cfg)[3].plan(ctx, 10)[0]
        out["shared"] = {"teacher": teacher_key(ctx.cfg, ctx.source, 0), "denoiser": diffusion_key(ctx),
                         "generated": generation_key(ctx, group)}
        return out

    results = [keys()]
    for edit in json.loads(sys.argv[2]):
        old = {}
        for rel, text in edit:
            path = root / rel
            old[path] = path.read_text() if path.exists() else None
            path.write_text((old[path] or "") + text)
        results.append(keys())
        for path, text in old.items():
            path.unlink() if text is None else path.write_text(text)
    print(json.dumps(results))
''')

EDIT = "\n# an edit\n"
IMPORT_HELPER = ("methods/rded.py", "\nfrom ddpipe.helper import VALUE  # noqa: E402,F401\n")
EDITS = {  # name: the files edited together
    **{rel: [(rel, EDIT)] for rel in ("augment.py", "methods/diffusion/generation.py", "evaluate.py",
                                      "methods/recovery/statistics.py", "report.py", "matrix.py")},
    "new module": [("helper.py", "VALUE = 1\n")],  # nothing imports it
    "imported": [("helper.py", "VALUE = 1\n"), IMPORT_HELPER],  # RDED imports it
    "edited": [("helper.py", "VALUE = 2\n"), IMPORT_HELPER],  # ... and it changes
}


@pytest.fixture(scope="module")
def keys_after(tmp_path_factory):
    """{file edited: keys after the edit} and the keys before any edit, from a temporary copy of the package."""
    root = tmp_path_factory.mktemp("copy")
    shutil.copytree(PACKAGE, root / "ddpipe", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", KEYS, str(root), json.dumps(list(EDITS.values()))],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before, *after = json.loads(done.stdout)
    return before, dict(zip(EDITS, after))


def changed(before: dict, after: dict) -> set[str]:
    return {f"{group}/{name}" for group, keys in before.items() for name, key in keys.items()
            if after[group][name] != key}


@pytest.mark.fmnist
def test_a_module_a_stage_imports_only_indirectly_changes_its_key(keys_after):
    before, after = keys_after
    # augment.py reaches the diffusion stage only through denoiser.py: its key and the denoiser's change.
    assert {"diffusion/diffusion", "shared/denoiser", "shared/teacher", "rded/scoring"} <= changed(
        before, after["augment.py"])
    # statistics.py reaches the recovery stage through recover.py's import of it.
    assert changed(before, after["methods/recovery/statistics.py"]) == {
        "gvbsm/moments", "gvbsm/statistics", "gvbsm/recovery", "gvbsm/synthesis"}


@pytest.mark.fmnist
def test_a_module_no_stage_imports_leaves_its_key(keys_after):
    before, after = keys_after
    # Sampling code: the generation stage and the generated pool only; the denoiser is not retrained.
    assert changed(before, after["methods/diffusion/generation.py"]) == {"diffusion/generation", "shared/generated"}
    # The students' code: the evaluation stage only; teachers, proxies, moments and distilled sets stay.
    assert changed(before, after["evaluate.py"]) == {f"{m}/evaluation" for m in ("rded", "el2n", "gvbsm", "diffusion")}
    assert changed(before, after["report.py"]) == set()
    assert changed(before, after["matrix.py"]) == set()
    assert changed(before, after["new module"]) == set()


@pytest.mark.fmnist
def test_a_new_module_counts_once_a_stage_imports_it(keys_after):
    _, after = keys_after
    assert changed(after["imported"], after["edited"]) == {"rded/scoring", "rded/synthesis"}


def test_imports_are_read_from_the_source_including_relative_and_lazy_ones(tmp_path):
    root = tmp_path / "ddpipe"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("from ddpipe.c import X\n")
    (root / "a.py").write_text("from ddpipe.sub import b\n\ndef f():\n    import ddpipe.c\n")
    (root / "sub" / "b.py").write_text("from . import d\nfrom ..c import X\nimport json\n")
    (root / "sub" / "d.py").write_text("import numpy\n")
    (root / "c.py").write_text("X = 1\n")
    (root / "e.py").write_text("from ddpipe.sub import d, NAME\n")
    tree = Tree(root)
    assert tree.imports_of("ddpipe.a") == {"ddpipe.sub.b", "ddpipe.c"}
    assert tree.imports_of("ddpipe.sub.b") == {"ddpipe.sub.d", "ddpipe.c"}
    assert tree.imports_of("ddpipe.e") == {"ddpipe.sub.d", "ddpipe.sub"}  # NAME is an attribute of the package
    assert tree.closure(["ddpipe.a"]) == ["ddpipe.a", "ddpipe.c", "ddpipe.sub.b", "ddpipe.sub.d"]
    before = tree.hash(["ddpipe.a"])
    (root / "sub" / "d.py").write_text("import numpy  # edited\n")
    assert tree.hash(["ddpipe.a"]) == before  # a tree is read once
    assert Tree(root).hash(["ddpipe.a"]) != before
    (root / "e.py").write_text("# not imported by a\n")
    assert Tree(root).hash(["ddpipe.a"]) == Tree(root).hash(["ddpipe.a"]) != before
