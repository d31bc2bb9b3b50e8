"""Executors: how the run-time decisions (which layers, recompute or reuse)
become compiled branches. Pass one, or its name, as a method's
``executor=``; see ``optax_sam/_src/executors.py`` for the trade-offs."""

from optax_sam._src.executors import Executor
from optax_sam._src.executors import Menu
from optax_sam._src.executors import SpecializedStep
from optax_sam._src.executors import auto
from optax_sam._src.executors import dense
from optax_sam._src.executors import depth_menu
from optax_sam._src.executors import gated
from optax_sam._src.executors import specialize
from optax_sam._src.executors import subset_menu
from optax_sam._src.executors import switch

__all__ = (
    "Executor",
    "Menu",
    "SpecializedStep",
    "auto",
    "dense",
    "depth_menu",
    "gated",
    "specialize",
    "subset_menu",
    "switch",
)
