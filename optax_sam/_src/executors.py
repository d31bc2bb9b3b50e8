"""Executors: turn a run-time layer selection into less computation.

A policy (``policies.py``) chooses, inside the jitted step, a boolean vector
over the layer groups. XLA only prunes work for a *static* subset (a gradient
with respect to some leaves compiles to fewer FLOPs; a 0/1 mask on a full
gradient does not). An executor bridges the two: it runs a *body* that is
written for a static superset of groups (Python bools, one per group) and
masks the dynamic selection inside it, so the result equals the dense
reference while the work is that of the static superset.

Executors here, and their trade-offs (measured by ``benchmarks/selection.py``,
figures in ``benchmarks/results/selection_*.json``):

* :func:`dense`: one body over all groups, masked. The reference; saves
  nothing.
* :func:`switch`: a bounded *menu* of static supersets compiled into one
  program and dispatched with ``lax.switch``; on CPU and GPU only the taken
  branch runs. One compilation (of every branch: compile time and program
  size grow with the menu). The default menu, :func:`depth_menu`, has one
  entry per depth: "every group from depth j to the output". The cost of a
  backward pass is set mostly by the lowest layer it must reach, so this
  menu is exact for output-side selections (the common case for
  gradient-norm selection) and otherwise pays for the weight gradients of
  the unselected groups above the lowest selected one. No host
  synchronisation; works for selections that change every step.
* :func:`specialize`: one program per distinct selection, compiled on first
  use and cached (bounded). The selection must be given statically; the
  loop helper :class:`SpecializedStep` reads it from the optimizer state
  (a device-to-host copy) before every step. Exact cost for any subset;
  pays one compilation per distinct subset and that synchronisation. Best
  when the selection changes rarely (re-selection every N steps).

Defaults: :func:`optax_sam.selective_sam` and :func:`optax_sam.layerwise_sam`
use ``switch``, because it is the only one that works wherever a jitted step
works (inside a user's ``jit``, ``pmap``, ``shard_map``, C1 and C2) and its
compiled branches have the right FLOPs. On the CPU, XLA runs its own
convolution gradients inside a conditional 10-40x slower than outside one
(jax-ml/jax#12868); :func:`optax_sam.make_update` therefore differentiates
the passes inside ``switch``'s branches with the forward-form convolution
backward (``conv_backward="auto"``, see ``conv.py``), and ``switch`` then
runs at 0.99-1.02x the equivalent static program's wall time (CNN,
ResNet-18; ``benchmarks/results/executor_cost.json``).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from optax_sam._src import step as step_lib

Flags = tuple[bool, ...]


class Menu(NamedTuple):
  """A bounded list of static group subsets, cheapest first.

  Attributes:
    entries: tuples of Python bools (one per group); the last entry is the
      full set, so every selection is covered.
  """
  entries: tuple[Flags, ...]

  def cover(self, selection: jax.Array) -> jax.Array:
    """int32 index of the first entry containing every selected group."""
    table = jnp.asarray(np.array(self.entries, bool))  # [B, L]
    covers = jnp.all(jnp.logical_or(table, ~selection[None, :]), axis=1)
    return jnp.argmax(covers).astype(jnp.int32)  # first True; full set last


def depth_menu(num_groups: int) -> Menu:
  """Entries "groups j..L-1" for j = L-1 down to 0 (cheapest first)."""
  return Menu(tuple(tuple(i >= j for i in range(num_groups))
                    for j in range(num_groups - 1, -1, -1)))


def subset_menu(subsets: Sequence[Sequence[int]], num_groups: int) -> Menu:
  """A menu of explicit subsets (group positions), in the given order.

  The full set is appended when missing, so every selection is covered.
  """
  entries = []
  for sub in subsets:
    flags = [False] * num_groups
    for i in sub:
      flags[int(i)] = True
    entries.append(tuple(flags))
  full = tuple([True] * num_groups)
  if full not in entries:
    entries.append(full)
  return Menu(tuple(entries))


MenuSpec = Union[None, str, Menu, Callable[[int], Menu]]


def _resolve_menu(menu: MenuSpec, num_groups: int) -> Menu:
  if menu is None or menu == "depth":
    return depth_menu(num_groups)
  if isinstance(menu, Menu):
    if any(len(e) != num_groups for e in menu.entries):
      raise ValueError(f"menu entries must have {num_groups} flags.")
    if tuple([True] * num_groups) not in menu.entries:
      raise ValueError("a menu must contain the full set of groups.")
    return menu
  if callable(menu):
    return _resolve_menu(menu(num_groups), num_groups)
  raise ValueError(f"unknown menu {menu!r}.")


class Executor(NamedTuple):
  """Runs ``body(flags)`` for a run-time ``selection``.

  Attributes:
    name: "dense", "switch" or "specialize".
    num_branches: ``num_groups -> number of static programs in one step``.
    run: ``run(selection, body, static_selection) -> (out, branch_index)``;
      ``body(flags)`` must give the same result for any ``flags`` covering
      ``selection`` (it masks the dynamic selection inside).
    branch_flags: ``num_groups -> list of the static flags of each branch``
      (empty for ``specialize``, whose programs are made on demand).
    conditional: whether ``run`` traces ``body`` inside a conditional
      (methods then mark the passes for the forward-form convolution
      backward, see :func:`optax_sam.make_update`).
  """
  name: str
  num_branches: Callable[[int], int]
  run: Callable[..., tuple[Any, jax.Array]]
  branch_flags: Callable[[int], list[Flags]]
  conditional: bool = False


def dense() -> Executor:
  """The reference: every group computed, the selection applied as a mask."""

  def run(selection, body, static_selection=None):
    del static_selection
    return body(tuple([True] * selection.shape[0])), jnp.int32(0)

  return Executor("dense", lambda n: 1, run,
                  lambda n: [tuple([True] * n)])


def switch(menu: MenuSpec = None) -> Executor:
  """A menu of static supersets dispatched by ``lax.switch``.

  Args:
    menu: a :class:`Menu`, a function ``num_groups -> Menu``, or None /
      ``"depth"`` for :func:`depth_menu`.

  Returns:
    An :class:`Executor`.
  """

  def run(selection, body, static_selection=None):
    del static_selection
    m = _resolve_menu(menu, selection.shape[0])
    index = m.cover(selection)
    branches = [lambda e=e: body(e) for e in m.entries]
    return jax.lax.switch(index, branches), index

  return Executor("switch", lambda n: len(_resolve_menu(menu, n).entries),
                  run, lambda n: list(_resolve_menu(menu, n).entries),
                  conditional=True)


def specialize() -> Executor:
  """One program per static selection (see :class:`SpecializedStep`).

  ``update`` must receive ``static_selection=`` (a tuple of bools equal to the
  state's selection); :class:`SpecializedStep` passes it. A step whose
  selection ``static_selection`` does not cover records branch -1
  (``SelectiveState.branch``), and :class:`SpecializedStep` raises on it.
  """

  def run(selection, body, static_selection=None):
    if static_selection is None:
      raise ValueError(
          "the 'specialize' executor needs static_selection=...: drive the "
          "step with optax_sam.SpecializedStep (it reads the selection from "
          "the state and compiles one program per selection), or use the "
          "'switch' executor.")
    flags = tuple(bool(f) for f in static_selection)
    if len(flags) != selection.shape[0]:
      raise ValueError(f"static_selection needs {selection.shape[0]} flags, "
                       f"got {len(flags)}.")
    covered = jnp.all(jnp.logical_or(jnp.asarray(flags), ~selection))
    # -1 marks a step whose selection the program did not cover (its
    # uncovered layers were not perturbed); SpecializedStep raises on it.
    return body(flags), jnp.where(covered, 0, -1).astype(jnp.int32)

  return Executor("specialize", lambda n: 1, run, lambda n: [])


EXECUTORS = {"dense": dense, "switch": switch, "specialize": specialize}


def get_executor(executor: Union[str, Executor, None],
                 default: str = "switch") -> Executor:
  """An :class:`Executor` from a name ("dense", "switch", "specialize")."""
  if executor is None:
    executor = default
  if isinstance(executor, Executor):
    return executor
  if executor not in EXECUTORS:
    raise ValueError(f"unknown executor {executor!r}; choose from "
                     f"{sorted(EXECUTORS)}.")
  return EXECUTORS[executor]()


# ------------------------------------------------- re-specialising loop


def _find_state(opt_state: Any, cls: type) -> Any:
  for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, cls)):
    if isinstance(x, cls):
      return x
  return None


def _first_replica(x) -> np.ndarray:
  """Host copy of a (possibly pmap-replicated) state entry, one replica."""
  x = np.asarray(jax.device_get(x))
  return x.reshape((-1,) + x.shape[x.ndim - 1:])[0] if x.ndim > 1 else x


class SpecializedStep:
  """Training-loop helper: one compiled program per static decision.

  Drives methods whose step can be specialised on a decision kept in their
  state, so that each program contains only the work of that decision and
  no conditional:

  * layer-selective methods (``selective_sam``/``layerwise_sam`` with
    ``executor="specialize"``): the selection (``static_selection=``);
  * reuse methods (``arsam``, ``looksam``, ``reuse_sam``): whether this step
    recomputes SAM's gradient (``static_recompute=``, from
    ``state.next_recompute``).

  Everything comes from ``tx`` and the optimizer state: before every step
  the decision is read from the state (a device-to-host copy of a few
  bools), so nothing on the host can go stale, a restored checkpoint
  resumes where it was, and no policy needs repeating. The copy waits for
  the previous step, which costs the overlap of host and device work
  (noticeable only for steps of a few milliseconds). Programs are compiled
  on first use and cached (at most ``max_cache``, least recently used
  evicted).

  Since convolutions run with a forward-form backward on the CPU
  (``conv_backward``), the conditionals of the default executors are as
  fast as these programs there; this helper remains the exact-cost option
  (any subset, no menu) and the one for backends where conditionals are
  slow.

  Example::

    tx = optax_sam.layerwise_sam(opt, num_layers=2, executor="specialize")
    step = optax_sam.SpecializedStep(tx, loss_fn)
    (loss, aux), updates, opt_state = step(params, opt_state, x, y)

  Args:
    tx: a selective method with ``executor="specialize"`` or a reuse method.
    loss_fn: as for :func:`optax_sam.make_update`.
    has_aux: as for :func:`optax_sam.make_update`.
    policy: deprecated and ignored (the decision is read from the state).
    max_cache: programs kept compiled.
    jit: the compiling wrapper (``jax.jit``, or e.g. a ``pmap``).
    conv_backward: as for :func:`optax_sam.make_update`.

  Attributes:
    compilations: number of programs compiled so far.
    selections: the distinct decisions seen, in order of first use.
  """

  def __init__(self, tx, loss_fn: Callable[..., Any], *, has_aux: bool = False,
               policy=None, max_cache: int = 8,
               jit: Callable[..., Any] = jax.jit,
               conv_backward: str = "auto"):
    if max_cache < 1:
      raise ValueError(f"max_cache must be >= 1, got {max_cache}.")
    if policy is not None:
      warnings.warn("SpecializedStep(policy=...) is deprecated and ignored: "
                    "the decision is read from the optimizer state.",
                    DeprecationWarning, stacklevel=2)
    self._update = step_lib.make_update(tx, loss_fn, has_aux=has_aux,
                                        conv_backward=conv_backward)
    self._max_cache = max_cache
    self._jit = jit
    self._cache: collections.OrderedDict[Any, Any] = (
        collections.OrderedDict())
    self.compilations = 0
    self.selections: list[Any] = []

  def _program(self, key: tuple[str, Any]):
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    kwarg, value = key
    update = self._update
    fn = self._jit(lambda p, s, *a, **kw: update(p, s, *a, **kw,
                                                 **{kwarg: value}))
    self._cache[key] = fn
    self.compilations += 1
    if value not in self.selections:
      self.selections.append(value)
    while len(self._cache) > self._max_cache:
      self._cache.popitem(last=False)
    return fn

  def _read(self, opt_state) -> tuple[str, Any]:
    state = _find_state(opt_state, _selective_state_type())
    if state is not None:
      if int(_first_replica(state.branch).reshape(-1)[0]) < 0:
        raise ValueError(
            "the last step's layer selection was not covered by the program "
            "it ran (update(..., static_selection=...) differed from the "
            "state's selection), so some selected layers were not "
            "perturbed. Let SpecializedStep pass static_selection.")
      return ("static_selection",
              tuple(bool(f) for f in _first_replica(state.policy.selection)))
    from optax_sam._src import reuse  # pylint: disable=g-import-not-at-top
    rstate = _find_state(opt_state, reuse.ReuseState)
    if rstate is not None:
      return ("static_recompute",
              bool(_first_replica(rstate.next_recompute).reshape(-1)[0]))
    raise ValueError("SpecializedStep drives selective methods (a policy "
                     "state) or reuse methods (arsam, looksam); neither was "
                     "found in opt_state.")

  def __call__(self, params, opt_state, *args, **extra_args):
    """One step: ``((loss, aux), updates, opt_state)`` as from
    :func:`optax_sam.make_update`; ``extra_args`` go to ``tx.update``."""
    program = self._program(self._read(opt_state))
    return program(params, opt_state, *args, **extra_args)


def _selective_state_type() -> type:
  from optax_sam._src import selective  # pylint: disable=g-import-not-at-top
  return selective.SelectiveState
