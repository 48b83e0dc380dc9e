"""The recovery family: SRe2L, CDA and G-VBSM optimise images from noise against the teachers' statistics.

:mod:`~ddpipe.methods.recovery.statistics` collects the statistics (the ``moments`` and ``statistics`` stages),
:mod:`~ddpipe.methods.recovery.recover` optimises the images (the ``recovery`` and ``synthesis`` stages). A
method's :class:`~ddpipe.methods.Recovery` variant says which teachers and statistics it matches.
"""

from __future__ import annotations

from ddpipe.methods import Method
from ddpipe.methods.recovery.recover import ASSEMBLY, RECOVERY
from ddpipe.methods.recovery.statistics import BN_STATISTICS, MOMENTS, STATISTICS
from ddpipe.pipeline import Stage


def stages(method: Method, cfg=None) -> tuple[Stage, ...]:
    if method.variant.conv_statistics:
        return (MOMENTS, STATISTICS, RECOVERY, ASSEMBLY)
    return (BN_STATISTICS, RECOVERY, ASSEMBLY)
