"""optax_sam: sharpness-aware minimization as Optax gradient transformations.

Every method is a factory whose first argument is the base optimizer and which
returns an ``optax.GradientTransformationExtraArgs``. Two call paths:

* C1 (drop-in): ``tx.update(grads, state, params, grad_fn=grad_fn)``;
* C2 (loss-driven): ``step = optax_sam.make_update(tx, loss_fn)``, where the
  library runs each gradient pass itself and restricted passes cost less.
"""

from optax_sam._src.asam import asam
from optax_sam._src.conv import conv_general_dilated
from optax_sam._src.conv import forward_form_convs
from optax_sam._src.conv import forward_form_covers
from optax_sam._src.conv import select_conv
from optax_sam._src.executors import Executor
from optax_sam._src.executors import Menu
from optax_sam._src.executors import SpecializedStep
from optax_sam._src.executors import depth_menu
from optax_sam._src.executors import subset_menu
from optax_sam._src.groups import LayerGroups
from optax_sam._src.groups import layer_groups
from optax_sam._src.groups import mask_fraction
from optax_sam._src.groups import mask_from_names
from optax_sam._src.groups import natural_order
from optax_sam._src.layerwise import lagnp
from optax_sam._src.layerwise import layerwise_policy
from optax_sam._src.layerwise import layerwise_sam
from optax_sam._src.perturb import asam_perturbation
from optax_sam._src.policies import LayerStats
from optax_sam._src.policies import Policy
from optax_sam._src.policies import PolicyState
from optax_sam._src.policies import bandit
from optax_sam._src.policies import fixed
from optax_sam._src.policies import random_k
from optax_sam._src.policies import reselect_every
from optax_sam._src.policies import top_k
from optax_sam._src.perturb import normalize
from optax_sam._src.perturb import safe_norm
from optax_sam._src.perturb import sam_perturbation
from optax_sam._src.perturb import scale_by_parameter_magnitude
from optax_sam._src.perturb import scale_by_rho
from optax_sam._src.sam import PlainState
from optax_sam._src.sam import SharpnessAwareState
from optax_sam._src.sam import plain
from optax_sam._src.sam import sam
from optax_sam._src.sam import sharpness_aware
from optax_sam._src.selective import SelectiveState
from optax_sam._src.selective import selective_sam
from optax_sam._src.step import GradientOracle
from optax_sam._src.step import make_update
from optax_sam._src.arsam import arsam
from optax_sam._src.looksam import looksam
from optax_sam._src.reuse import AdaptiveScheduleState
from optax_sam._src.reuse import Mixer
from optax_sam._src.reuse import ReuseSchedule
from optax_sam._src.reuse import ReuseState
from optax_sam._src.reuse import ReuseStats
from optax_sam._src.reuse import ScheduleState
from optax_sam._src.reuse import orthogonal_mixer
from optax_sam._src.reuse import psf_mixer
from optax_sam._src.reuse import recompute_adaptive
from optax_sam._src.reuse import recompute_always
from optax_sam._src.reuse import recompute_every
from optax_sam._src.reuse import recompute_fraction
from optax_sam._src.reuse import recompute_never
from optax_sam._src.reuse import recompute_with_probability
from optax_sam._src.reuse import reuse_sam

__version__ = "0.1.0"

__all__ = (
    "AdaptiveScheduleState",
    "Executor",
    "GradientOracle",
    "LayerGroups",
    "LayerStats",
    "Menu",
    "Mixer",
    "PlainState",
    "Policy",
    "PolicyState",
    "ReuseSchedule",
    "ReuseState",
    "ReuseStats",
    "ScheduleState",
    "SelectiveState",
    "SharpnessAwareState",
    "SpecializedStep",
    "arsam",
    "asam",
    "asam_perturbation",
    "bandit",
    "conv_general_dilated",
    "depth_menu",
    "fixed",
    "forward_form_convs",
    "forward_form_covers",
    "lagnp",
    "layer_groups",
    "layerwise_policy",
    "layerwise_sam",
    "looksam",
    "make_update",
    "mask_fraction",
    "mask_from_names",
    "natural_order",
    "normalize",
    "orthogonal_mixer",
    "plain",
    "psf_mixer",
    "random_k",
    "recompute_adaptive",
    "recompute_always",
    "recompute_every",
    "recompute_fraction",
    "recompute_never",
    "recompute_with_probability",
    "reselect_every",
    "reuse_sam",
    "safe_norm",
    "sam",
    "sam_perturbation",
    "scale_by_parameter_magnitude",
    "scale_by_rho",
    "select_conv",
    "selective_sam",
    "sharpness_aware",
    "subset_menu",
    "top_k",
)
