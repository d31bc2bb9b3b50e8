"""Recompute schedules and mixers: when the ascent runs, and what the other
steps descend along.

Pass a schedule (and optionally a mixer) to a method's ``schedule=``
(``optax_sam.sam``, ``layerwise_sam``, ``arsam``, ``looksam``,
``sharpness_aware``). ARSAM's adaptive rule and PSF mixer and LookSAM's
orthogonal mixer are defined with those methods and re-exported here.
Periodic SAM is ``recompute_every(k)`` with :func:`plain_mixer`; SAM late in
training is :func:`late_phase` with :func:`plain_mixer`.
"""

from optax_sam._src.arsam import AdaptiveScheduleState
from optax_sam._src.arsam import psf_mixer
from optax_sam._src.arsam import recompute_adaptive
from optax_sam._src.looksam import orthogonal_mixer
from optax_sam._src.schedules import LatePhaseState
from optax_sam._src.schedules import Mixer
from optax_sam._src.schedules import ReuseSchedule
from optax_sam._src.schedules import ReuseStats
from optax_sam._src.schedules import ScheduleState
from optax_sam._src.schedules import late_phase
from optax_sam._src.schedules import plain_mixer
from optax_sam._src.schedules import recompute_always
from optax_sam._src.schedules import recompute_every
from optax_sam._src.schedules import recompute_never
from optax_sam._src.schedules import recompute_with_probability
from optax_sam._src.schedules import target_fraction_bounds

__all__ = (
    "AdaptiveScheduleState",
    "LatePhaseState",
    "Mixer",
    "ReuseSchedule",
    "ReuseStats",
    "ScheduleState",
    "late_phase",
    "orthogonal_mixer",
    "plain_mixer",
    "psf_mixer",
    "recompute_adaptive",
    "recompute_always",
    "recompute_every",
    "recompute_never",
    "recompute_with_probability",
    "target_fraction_bounds",
)
