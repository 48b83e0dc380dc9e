"""The distillation methods, and their registry: :data:`METHODS` is the only list of method names.

A run is ``dataset, teacher, <the method's stages>, random_subset, labels, evaluation``
(:func:`ddpipe.stages.stages_for`). Every method belongs to a family, a module or sub-package of this package
whose ``stages(method)`` returns the method's stages; the last of them is named ``synthesis`` and writes the
distilled set (``distilled/images/...``, ``distilled/provenance/...``, see :mod:`ddpipe.imageset`).

=========  ==================================  ========================================================
family     methods                             stages
=========  ==================================  ========================================================
rded       rded                                scoring, synthesis
recovery   sre2l, cda, gvbsm                   (moments), statistics, recovery, synthesis
selection  random, herding, kcenter,           synthesis; (dynamics) for el2n, forgetting, cad;
           el2n, forgetting, cad, ca2d         ca2d: dynamics, scoring, synthesis (RDED's, on the CAD pool)
diffusion  diffusion                           diffusion, generation, quality, synthesis
refine     refine                              scoring (RDED's), (moments), statistics, refinement,
                                               synthesis
=========  ==================================  ========================================================

What tells the methods of one family apart is data in their entry (``variant``: :class:`Recovery`,
:class:`Selection`), never a check on the method's name. A refining method's variant is completed by its config
(``method.refine``: which teachers, which statistics), :meth:`Method.variant_for`; its stages depend on the config
too, so a family's ``stages(method, cfg)`` gets it (None: the stages of the method's default settings). This module imports no family: the config
(:mod:`ddpipe.config`) reads it to validate ``method.name``, and a family module is loaded only when a run
uses it. Adding a method: one module (or a variant of a family), one entry here, its tests
(docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Recovery:
    """How a recovery method optimises images from noise against the teachers' statistics (SRe2L when all off)."""

    all_teachers: bool = False  # match every teacher (primary, then teacher.ensemble), one per step, round robin
    conv_statistics: bool = False  # G-VBSM's matching: + conv-input channel/patch statistics (a moments pass over
    # the data), each compared statistic in the EMA form of Eq. 6, conv layers dropped at random, the DD loss
    class_major: bool = False  # one class-major batch per recovery unit (else a batch of distinct classes per ipc index)
    curriculum: bool = False  # CDA's crop-scale curriculum (method.recovery.curriculum)
    refine: bool = False  # starts from real images (RDED's stitched patches or random ones), the choices in method.refine


@dataclass(frozen=True)
class Selection:
    """How a selection keeps real images: by ``score`` (random; herding or kcenter on teacher features; el2n,
    forgetting or cad from training dynamics), the images themselves or, with ``pool`` (CA2D), as RDED's
    candidate pool that RDED then scores and stitches."""

    score: str
    pool: bool = False


@dataclass(frozen=True)
class Method:
    family: str  # the module of this package that makes the stages: ddpipe.methods.<family>.stages(method)
    summary: str
    stitches: bool = False  # stitches scored patches as RDED does: method.factor and candidates_per_class apply
    variant: Recovery | Selection | None = None

    @property
    def recovers(self) -> bool:
        """Optimises images against BatchNorm statistics: every teacher needs batch norm."""
        return isinstance(self.variant, Recovery)

    def variant_for(self, method_config):
        """The variant a run uses: the entry's, with a refining method's choices (``method.refine``: every
        teacher or the primary, conv statistics or not) filled in from ``method_config``."""
        v = self.variant
        if isinstance(v, Recovery) and v.refine:
            r = method_config.refine
            return replace(v, all_teachers=r.teachers == "all", conv_statistics=r.conv_statistics)
        return v

    def stages(self, cfg=None) -> tuple:
        """The method's own stages (:class:`ddpipe.pipeline.Stage`), in order, from its family's module, for the
        run config ``cfg`` (None: with the method's default settings)."""
        return importlib.import_module(f"{__name__}.{self.family}").stages(self, cfg)


METHODS: dict[str, Method] = {
    "rded": Method("rded", "score crops of real images with the teacher, stitch the most realistic (Sun et al., "
                   "CVPR'24)", stitches=True),
    "sre2l": Method("recovery", "images from noise that match the teacher's BatchNorm statistics", variant=Recovery()),
    "cda": Method("recovery", "sre2l with a crop-scale curriculum", variant=Recovery(curriculum=True)),
    "gvbsm": Method("recovery", "sre2l over several backbones, with conv channel/patch statistics and data "
                    "densification", variant=Recovery(all_teachers=True, conv_statistics=True, class_major=True)),
    "random": Method("selection", "real images drawn at random", variant=Selection("random")),
    "herding": Method("selection", "herding on the teacher's features", variant=Selection("herding")),
    "kcenter": Method("selection", "k-center greedy on the teacher's features", variant=Selection("kcenter")),
    "el2n": Method("selection", "the EL2N score at an early checkpoint of proxy training", variant=Selection("el2n")),
    "forgetting": Method("selection", "forgetting events during proxy training", variant=Selection("forgetting")),
    "cad": Method("selection", "CAD-Prune, the spread of EL2N over proxy checkpoints", variant=Selection("cad")),
    "ca2d": Method("selection", "rded on the candidate pool cad chooses", stitches=True,
                   variant=Selection("cad", pool=True)),
    "diffusion": Method("diffusion", "images sampled from a class-conditional denoiser trained on the data"),
    "refine": Method("refine", "RDED's stitched real patches (or random real ones) optimised against the teachers "
                     "and kept near their start (CIM, FADRM, EDC; method.refine)", stitches=True,
                     variant=Recovery(refine=True)),
}
