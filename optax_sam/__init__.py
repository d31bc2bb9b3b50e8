"""optax_sam: sharpness-aware minimization as Optax gradient transformations.

Every method is a factory whose first argument is the base optimizer and which
returns an ``optax.GradientTransformationExtraArgs``; all are one engine,
:func:`sharpness_aware` (perturbation x layer policy x recompute schedule x
executor). Two call paths:

* C1 (drop-in): ``tx.update(grads, state, params, grad_fn=grad_fn)``;
* C2 (loss-driven): ``step = optax_sam.make_update(tx, loss_fn)``, where the
  library runs each gradient pass itself and restricted passes cost less.

Building blocks live in submodules, as optax does: :mod:`optax_sam.policies`
(which layers), :mod:`optax_sam.schedules` (when, and the mixers),
:mod:`optax_sam.executors` and :mod:`optax_sam.perturbations`.
"""

import importlib as _importlib
import warnings as _warnings

from optax_sam import executors
from optax_sam import perturbations
from optax_sam import policies
from optax_sam import schedules
from optax_sam._src.arsam import arsam
from optax_sam._src.asam import asam
from optax_sam._src.batching import per_example_loss
from optax_sam._src.conv import conv_general_dilated
from optax_sam._src.conv import forward_form_convs
from optax_sam._src.conv import forward_form_covers
from optax_sam._src.conv import select_conv
from optax_sam._src.engine import SharpnessAwareState
from optax_sam._src.engine import recompute_fraction
from optax_sam._src.engine import sharpness_aware
from optax_sam._src.esam import esam
from optax_sam._src.executors import Executor
from optax_sam._src.executors import SpecializedStep
from optax_sam._src.executors import dense
from optax_sam._src.executors import specialize
from optax_sam._src.executors import switch
from optax_sam._src.fsam import fsam
from optax_sam._src.groups import LayerGroups
from optax_sam._src.gsam import gsam
from optax_sam._src.groups import layer_groups
from optax_sam._src.groups import natural_order
from optax_sam._src.layerwise import lagnp
from optax_sam._src.layerwise import layerwise_sam
from optax_sam._src.looksam import looksam
from optax_sam._src.msam import msam
from optax_sam._src.perturb import asam_perturbation
from optax_sam._src.perturb import sam_perturbation
from optax_sam._src.sam import PlainState
from optax_sam._src.sam import plain
from optax_sam._src.sam import sam
from optax_sam._src.sam_on import sam_on
from optax_sam._src.slsam import slsam
from optax_sam._src.step import GradientOracle
from optax_sam._src.step import make_update

__version__ = "0.2.0"

__all__ = (
    "Executor",
    "GradientOracle",
    "LayerGroups",
    "PlainState",
    "SharpnessAwareState",
    "SpecializedStep",
    "arsam",
    "asam",
    "asam_perturbation",
    "conv_general_dilated",
    "dense",
    "esam",
    "executors",
    "forward_form_convs",
    "forward_form_covers",
    "fsam",
    "gsam",
    "lagnp",
    "layer_groups",
    "layerwise_sam",
    "looksam",
    "make_update",
    "msam",
    "natural_order",
    "per_example_loss",
    "perturbations",
    "plain",
    "policies",
    "recompute_fraction",
    "sam",
    "sam_on",
    "sam_perturbation",
    "schedules",
    "select_conv",
    "slsam",
    "sharpness_aware",
    "specialize",
    "switch",
)

# Names of version 0.1, kept for one release: each warns once and points at
# its new home.
_DEPRECATED = {
    "AdaptiveScheduleState": "optax_sam.schedules",
    "Mixer": "optax_sam.schedules",
    "ReuseSchedule": "optax_sam.schedules",
    "ReuseStats": "optax_sam.schedules",
    "ScheduleState": "optax_sam.schedules",
    "orthogonal_mixer": "optax_sam.schedules",
    "psf_mixer": "optax_sam.schedules",
    "recompute_adaptive": "optax_sam.schedules",
    "recompute_always": "optax_sam.schedules",
    "recompute_every": "optax_sam.schedules",
    "recompute_never": "optax_sam.schedules",
    "recompute_with_probability": "optax_sam.schedules",
    "LayerStats": "optax_sam.policies",
    "Policy": "optax_sam.policies",
    "PolicyState": "optax_sam.policies",
    "bandit": "optax_sam.policies",
    "fixed": "optax_sam.policies",
    "layerwise_policy": "optax_sam.policies",
    "random_k": "optax_sam.policies",
    "reselect_every": "optax_sam.policies",
    "top_k": "optax_sam.policies",
    "Menu": "optax_sam.executors",
    "depth_menu": "optax_sam.executors",
    "subset_menu": "optax_sam.executors",
    "normalize": "optax_sam.perturbations",
    "safe_norm": "optax_sam.perturbations",
    "scale_by_parameter_magnitude": "optax_sam.perturbations",
    "scale_by_rho": "optax_sam.perturbations",
    "mask_fraction": "optax_sam._src.groups",
    "mask_from_names": "optax_sam._src.groups",
    "selective_sam": "optax_sam._src.engine",
    "reuse_sam": "optax_sam._src.engine",
}
_RENAMED = {
    "SelectiveState": ("optax_sam._src.engine", "SharpnessAwareState"),
    "ReuseState": ("optax_sam._src.engine", "SharpnessAwareState"),
}
_ADVICE = {
    "selective_sam": "use optax_sam.sharpness_aware(opt, policy=...)",
    "reuse_sam": ("use optax_sam.sharpness_aware(opt, schedule=..., "
                  "mixer=...)"),
    "mask_from_names": "use optax_sam.layer_groups(params).mask(names)",
    "mask_fraction": "use optax_sam.layer_groups(params) and its sizes",
}


def __getattr__(name):
  if name in _DEPRECATED or name in _RENAMED:
    module, attr = _RENAMED.get(name, (_DEPRECATED.get(name), name))
    advice = _ADVICE.get(name) or (
        f"use {module}.{attr}" if not module.startswith("optax_sam._src")
        else f"use optax_sam.{attr}")
    _warnings.warn(f"optax_sam.{name} is deprecated: {advice}.",
                   DeprecationWarning, stacklevel=2)
    return getattr(_importlib.import_module(module), attr)
  raise AttributeError(f"module 'optax_sam' has no attribute {name!r}")
