"""The stages of a run, in order, and the checks a run makes before its first stage.

Every run is ``dataset, teacher, <the method's stages>, random_subset, labels, evaluation``. The shared stages
live with what they compute (:mod:`ddpipe.dataset`, :mod:`ddpipe.teacher`, :mod:`ddpipe.labels`,
:mod:`ddpipe.evaluate`); the method's come from its family (:mod:`ddpipe.methods`). This module defines no
stage, so nothing here enters a stage's key.

=============  ======================  =====================================================================
stage          shards                  outputs (relative to the run folder)
=============  ======================  =====================================================================
dataset        one                     ``dataset/classes.parquet``, ``dataset/dataset.json``
teacher        one per backbone        ``teacher/teacher.pt``, ``teacher/metrics.json`` (primary);
                                       ``teacher/memberK.pt``, ``teacher/memberK.json`` (teacher.ensemble)
(method)       (see ddpipe.methods)    ..., last ``synthesis``: ``distilled/images/...png``,
                                       ``distilled/provenance/class=CCCCC.parquet``
random_subset  class groups            ``random/images/...png``, ``random/provenance/...parquet``
labels         set x class groups      ``{distilled,random}/labels/class=CCCCC.parquet``
evaluation     set x regime x seed     ``evaluation/{set}-{regime}-seed{S}.json`` (main student),
               (x student)             ``evaluation/{set}-{regime}-seed{S}-student{K}.json`` (cross_models)
=============  ======================  =====================================================================
"""

from __future__ import annotations

from ddpipe.baseline import RANDOM_SUBSET
from ddpipe.config import RunConfig
from ddpipe.dataset import DATASET, check_data
from ddpipe.evaluate import EVALUATION
from ddpipe.labels import LABELS
from ddpipe.methods import METHODS
from ddpipe.pipeline import Stage, context_for
from ddpipe.teacher import TEACHER, check_teacher_checkpoint


def stages_for(cfg: RunConfig) -> list[Stage]:
    """The stages of a run, in order. The first stage always describes the dataset."""
    return [DATASET, TEACHER, *METHODS[cfg.method.name].stages(cfg), RANDOM_SUBSET, LABELS, EVALUATION]


def all_stages() -> list[Stage]:
    """Every stage any method's run can have, each once (the shared ones, then each method's own)."""
    own = list(dict.fromkeys(s for m in METHODS.values() for s in m.stages()))
    return [DATASET, TEACHER, RANDOM_SUBSET, LABELS, EVALUATION, *own]


def preflight(cfg: RunConfig) -> None:
    """The checks that need no teacher: device present, store writable, data present and big enough, checkpoint
    class map.

    The stages repeat them where they matter; this runs them up front so a bad input fails in a second.
    """
    ctx = context_for(cfg)
    ctx.device  # a device this machine lacks is refused here
    ctx.store.check_writable()
    check_data(cfg, ctx.source)
    check_teacher_checkpoint(cfg, ctx.source.classes)
