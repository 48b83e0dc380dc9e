"""The diffusion family: a class-conditional denoiser trained on the data (:mod:`.denoiser`, the ``diffusion``
stage in :mod:`.training`), sampled with DPM-Solver (:mod:`.generation`), its pool measured and reduced to
``ipc`` images per class (:mod:`.pool`). Design and results: docs/diffusion.md.
"""

from __future__ import annotations

from ddpipe.methods import Method
from ddpipe.methods.diffusion.generation import GENERATION
from ddpipe.methods.diffusion.pool import GENERATED_SELECTION, QUALITY
from ddpipe.methods.diffusion.training import DIFFUSION
from ddpipe.pipeline import Stage


def stages(method: Method, cfg=None) -> tuple[Stage, ...]:
    return (DIFFUSION, GENERATION, QUALITY, GENERATED_SELECTION)
