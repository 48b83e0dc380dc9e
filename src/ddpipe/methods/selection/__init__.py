"""The selection family: coresets of whole real images (random, herding, k-center greedy, EL2N, forgetting
events, CAD-Prune) and CA2D (RDED on the pool CAD-Prune chooses).

:mod:`~ddpipe.methods.selection.coreset` holds the scores, :mod:`~ddpipe.methods.selection.dynamics` the proxy
training they read (the ``dynamics`` stage), :mod:`~ddpipe.methods.selection.select` the ``synthesis`` stage,
:mod:`~ddpipe.methods.selection.ca2d` CA2D's ``scoring``. A method's :class:`~ddpipe.methods.Selection` variant names its score.
"""

from __future__ import annotations

from ddpipe.methods import Method
from ddpipe.methods.rded import SYNTHESIS as RDED_SYNTHESIS
from ddpipe.methods.selection.ca2d import CA2D_SCORING
from ddpipe.methods.selection.dynamics import DYNAMICS
from ddpipe.methods.selection.select import DYNAMICS_SCORES, DYNAMICS_SELECTION, SELECTION
from ddpipe.pipeline import Stage


def stages(method: Method, cfg=None) -> tuple[Stage, ...]:
    if method.variant.pool:
        return (DYNAMICS, CA2D_SCORING, RDED_SYNTHESIS)
    if method.variant.score in DYNAMICS_SCORES:
        return (DYNAMICS, DYNAMICS_SELECTION)
    return (SELECTION,)
