"""Perturbation (ascent) transforms, gradient -> ``eps``: the building blocks
of ``optax_sam.sharpness_aware``'s first argument."""

from optax_sam._src.fsam import friendly_perturbation
from optax_sam._src.gsam import gsam_descent
from optax_sam._src.gsam import lr_tied_rho
from optax_sam._src.msam import momentum_observer
from optax_sam._src.msam import momentum_perturbation
from optax_sam._src.perturb import asam_perturbation
from optax_sam._src.perturb import normalize
from optax_sam._src.perturb import safe_norm
from optax_sam._src.perturb import sam_perturbation
from optax_sam._src.perturb import scale_by_parameter_magnitude
from optax_sam._src.perturb import scale_by_rho

__all__ = (
    "asam_perturbation",
    "friendly_perturbation",
    "gsam_descent",
    "lr_tied_rho",
    "momentum_observer",
    "momentum_perturbation",
    "normalize",
    "safe_norm",
    "sam_perturbation",
    "scale_by_parameter_magnitude",
    "scale_by_rho",
)
