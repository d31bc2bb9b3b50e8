"""Layer policies: which layer groups take part in a step, chosen at run time.

Pass one to a method's ``policy=`` (``optax_sam.sam``, ``arsam``,
``looksam``, ``sharpness_aware``); ``optax_sam.layerwise_sam`` builds its own
(:func:`layerwise_policy`). See ``optax_sam/_src/policies.py``.
"""

from optax_sam._src.layerwise import layerwise_policy
from optax_sam._src.policies import LayerStats
from optax_sam._src.policies import Policy
from optax_sam._src.policies import PolicyState
from optax_sam._src.policies import bandit
from optax_sam._src.policies import budget_mask
from optax_sam._src.policies import fixed
from optax_sam._src.policies import random_k
from optax_sam._src.policies import reselect_every
from optax_sam._src.policies import selection_cost
from optax_sam._src.policies import top_k
from optax_sam._src.policies import top_k_mask

__all__ = (
    "LayerStats",
    "Policy",
    "PolicyState",
    "bandit",
    "budget_mask",
    "fixed",
    "layerwise_policy",
    "random_k",
    "reselect_every",
    "selection_cost",
    "top_k",
    "top_k_mask",
)
