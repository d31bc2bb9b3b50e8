"""Executors: turn the engine's run-time decisions into less computation.

A policy (``policies.py``) chooses, inside the jitted step, a boolean vector
over the layer groups, and a schedule (``schedules.py``) whether the step
runs the ascent. XLA only prunes work for a *static* subset (a gradient with
respect to some leaves compiles to fewer FLOPs; a 0/1 mask on a full gradient
does not) and a *static* decision. An executor bridges the two: the engine
writes a *body* for a static superset of groups (Python bools) and a static
recompute/reuse decision, and masks the run-time selection inside it, so the
result equals the dense reference while the work is that of the branch.

Executors here, and their trade-offs (figures in
``benchmarks/results/executor_cost*.json``, made by ``benchmarks/cost.py``):

* :func:`dense`: the selection as a mask over full passes (the reference;
  saves nothing from the selection). Recompute/reuse stays a conditional.
* :func:`switch`: a bounded *menu* of static supersets, times
  recompute/reuse, compiled into one program and dispatched with
  ``lax.switch``; on CPU and GPU only the taken branch runs. The default
  menu, :func:`depth_menu`, has one entry per depth: "every group from
  depth j to the output". The cost of a backward pass is set mostly by the
  lowest layer it must reach, so this menu is exact for output-side
  selections and otherwise pays for the weight gradients of the unselected
  groups above the lowest selected one. No host synchronisation.
* :func:`specialize`: one program per distinct decision, compiled on first
  use and cached (bounded), driven by :class:`SpecializedStep`, which reads
  the decisions from the optimizer state (a device-to-host copy) before
  every step. Exact cost for any subset, no conditional; pays one
  compilation per distinct decision and that synchronisation.
* :func:`gated`: one program over every group whose passes skip, at run
  time, the weight-gradient products of the unselected leaves and the
  backward pass below the lowest selected one (``gating.py``): for
  per-tensor random subsets (SL-SAM's default), which no bounded menu
  serves. C2 only; with a C1 ``grad_fn`` it is ``dense``.
* :func:`auto` (the default): ``switch``, except where its branches would be
  slow. On the CPU XLA runs its own convolution gradients inside a
  conditional 10-40x slower than outside one (jax-ml/jax#12868, DESIGN.md
  §6c); :func:`optax_sam.make_update` differentiates the passes inside
  branches with the forward-form convolution backward
  (``conv_backward="auto"``, ``conv.py``), and ``switch`` then runs at
  0.99-1.02x the equivalent static program's wall time. Where the passes
  cannot be rewritten (a C1 ``grad_fn`` with convolutions, or
  ``conv_backward="xla"``) ``auto`` uses ``dense(conditional=False)``: no
  conditional, SAM's cost on every step, never the 25-30x of XLA's rule
  inside one.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from optax_sam._src import policies as policies_lib
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
  """How the engine turns its run-time decisions into compiled branches.

  Attributes:
    name: "auto", "dense", "gated", "switch" or "specialize".
    menu: ``num_groups -> Menu`` of the static supersets compiled (None for
      ``specialize``, whose programs are made on demand, and ``auto``).
  """
  name: str
  menu: Optional[Callable[[int], Menu]] = None
  conditional: bool = True


def dense(conditional: bool = True) -> Executor:
  """The reference: every group computed, the selection applied as a mask.

  Args:
    conditional: a schedule's recompute/reuse decision runs as a
      conditional (the reuse saving). False: both are computed and the
      decision selects one, with no conditional at all (every step costs
      SAM's two passes, never more; what ``auto`` falls back to where
      conditionals are slow).
  """
  return Executor("dense", lambda n: Menu((tuple([True] * n),)),
                  bool(conditional))


def switch(menu: MenuSpec = None) -> Executor:
  """A menu of static supersets dispatched by ``lax.switch``.

  With a schedule, each menu entry has a recompute branch, and the reuse
  steps one more branch (one per entry when the clean pass depends on the
  selection). On CPU and GPU only the taken branch runs.

  Args:
    menu: a :class:`Menu`, a function ``num_groups -> Menu``, or None /
      ``"depth"`` for :func:`depth_menu`.

  Returns:
    An :class:`Executor`.
  """
  return Executor("switch", lambda n: _resolve_menu(menu, n))


def specialize() -> Executor:
  """One program per static decision (see :class:`SpecializedStep`).

  ``update`` must receive ``static_selection=`` (a tuple of bools equal to the
  state's selection); :class:`SpecializedStep` passes it, and
  ``static_recompute=`` for a schedule. A step whose selection
  ``static_selection`` does not cover records branch -1
  (``SharpnessAwareState.branch``), and :class:`SpecializedStep` raises on
  it.
  """
  return Executor("specialize", None)


def gated() -> Executor:
  """One program over every layer whose passes skip, at run time, the
  weight-gradient products of the unselected leaves (``gating.py``).

  For selections that no bounded menu serves, such as SL-SAM's random
  subset of tensors (whose lowest member is nearly always near the input):
  each matrix product and convolution of ``loss_fn`` computes its weight
  gradient under ``lax.cond(selected)`` and its input gradient only while a
  selected leaf lies below it, the PyTorch ``requires_grad=False`` saving.
  C2 only (:func:`optax_sam.make_update`); with a C1 ``grad_fn`` the
  caller's gradients are full and the selection is a mask (``dense``'s
  cost). Convolutions run in forward form inside the conditionals (fast on
  the CPU); what it does not gate is listed in ``gating.py``.
  """
  return Executor("gated", lambda n: Menu((tuple([True] * n),)))


def auto() -> Executor:
  """``switch``, except where its branches would be slow: on the CPU, when
  the passes would differentiate XLA's own convolutions inside a
  conditional (10-40x slower there): a C1 ``grad_fn`` that runs
  convolutions, or C2 with ``conv_backward="xla"``. Those use
  ``dense(conditional=False)``: no conditional, SAM's cost on every step
  (never more). C2's default ``conv_backward="auto"`` keeps ``switch``."""
  return Executor("auto", None)


EXECUTORS = {"auto": auto, "dense": dense, "gated": gated,
             "switch": switch, "specialize": specialize}


def get_executor(executor: Union[str, Executor, None],
                 default: str = "auto") -> Executor:
  """An :class:`Executor` from a name ("auto", "dense", "gated", "switch",
  "specialize")."""
  if executor is None:
    executor = default
  if isinstance(executor, Executor):
    return executor
  if executor not in EXECUTORS:
    raise ValueError(f"unknown executor {executor!r}; choose from "
                     f"{sorted(EXECUTORS)}.")
  return EXECUTORS[executor]()


def resolve_auto(executor: Executor, oracle: Any = None,
                 params: Any = None) -> Executor:
  """The executor ``auto`` stands for with this oracle (``switch`` when no
  oracle is known yet, e.g. to size the state)."""
  if executor.name != "auto":
    return executor
  if oracle is None or jax.default_backend() != "cpu":
    return switch()
  if oracle.slow_in_conditionals(params):
    return dense(conditional=False)
  return switch()


Case = tuple[Flags, bool]


class Plan(NamedTuple):
  """The static branches of one step (see :func:`plan`).

  Attributes:
    executor: the executor (``auto`` resolved).
    num_groups: number of layer groups.
    entries: the static supersets (menu entries); one full entry without a
      policy or with ``dense``; empty for ``specialize``.
    recompute: the schedule's static decision, or None when it is decided
      at run time.
    reuse_needs_flags: whether a reuse step depends on the entry (its clean
      pass is restricted to it), so that each entry has a reuse branch.
    cases: ``(flags, recompute)`` of every branch, in branch order.
    num_branches: ``len(cases)`` (recompute/reuse for ``specialize``).
  """
  executor: Executor
  num_groups: int
  entries: tuple[Flags, ...]
  recompute: Optional[bool]
  reuse_needs_flags: bool
  cases: tuple[Case, ...]
  num_branches: int


def plan(executor: Executor, num_groups: int, *, with_policy: bool,
         recompute: Optional[bool], reuse_needs_flags: bool,
         oracle: Any = None, params: Any = None) -> Plan:
  """The branches the engine compiles for one step."""
  ex = resolve_auto(executor, oracle, params)
  full = tuple([True] * num_groups)
  if ex.name == "specialize":
    entries: tuple[Flags, ...] = ()
  elif not with_policy:
    entries = (full,)
  else:
    entries = tuple(ex.menu(num_groups).entries)
  options = [True, False] if recompute is None else [bool(recompute)]
  cases: list[Case] = []
  for rec in options:
    if rec or reuse_needs_flags:
      cases += [(e, rec) for e in entries]
    else:
      cases.append((full, False))
  num = len(options) if ex.name == "specialize" else len(cases)
  return Plan(ex, num_groups, entries, recompute, reuse_needs_flags,
              tuple(cases), num)


def run(the_plan: Plan, body: Callable[[Flags, bool], Any], *,
        selection: Optional[jax.Array], recompute: Any,
        static_selection: Optional[Flags] = None,
        oracle: Any = None) -> tuple[Any, jax.Array]:
  """Runs ``body(flags, recompute)`` for the run-time decisions.

  Args:
    the_plan: from :func:`plan`.
    body: ``body(flags, recompute)``, written for a static superset
      ``flags`` of the selection (it masks the run-time selection inside)
      and a static ``recompute``; every call must return the same structure.
    selection: bool[L] run-time selection, or None (every group, static).
    recompute: a Python bool (static) or a traced bool.
    static_selection: flags given on the host (:class:`SpecializedStep`):
      that superset is compiled as its own program.
    oracle: the step's gradient oracle (its passes inside a conditional are
      marked, see :meth:`optax_sam.GradientOracle.conditional`).

  Returns:
    ``(out, branch)``: ``branch`` is the index of the case in
    ``the_plan.cases`` (for ``specialize`` and ``static_selection``:
    0 recompute, 1 reuse), -1 when ``static_selection`` does not cover
    ``selection``.
  """
  n = the_plan.num_groups
  full = tuple([True] * n)
  static_rec = isinstance(recompute, (bool, np.bool_))
  conditional = oracle.conditional() if oracle is not None else (
      contextlib.nullcontext())

  if static_selection is not None or the_plan.executor.name == "specialize":
    if static_selection is None and selection is not None:
      raise ValueError(
          "the 'specialize' executor needs static_selection=...: drive the "
          "step with optax_sam.SpecializedStep (it reads the decisions from "
          "the state and compiles one program per decision), or use the "
          "'switch' executor.")
    flags = full if static_selection is None else tuple(
        bool(f) for f in static_selection)
    if len(flags) != n:
      raise ValueError(f"static_selection needs {n} flags, got {len(flags)}.")
    if static_rec:
      out = body(flags, bool(recompute))
    else:
      with conditional:
        out = jax.lax.cond(recompute, lambda: body(flags, True),
                           lambda: body(flags, False))
    index = jnp.where(recompute, 0, 1).astype(jnp.int32)
    if selection is not None:
      covered = jnp.all(jnp.logical_or(jnp.asarray(flags), ~selection))
      # -1 marks a step whose selection the program did not cover (its
      # uncovered layers were not perturbed); SpecializedStep raises on it.
      index = jnp.where(covered, index, -1).astype(jnp.int32)
    return out, index

  entries = the_plan.entries
  if selection is None or len(entries) == 1:
    entry = jnp.int32(0)
  else:
    entry = Menu(entries).cover(selection)
  rnf = the_plan.reuse_needs_flags
  if the_plan.recompute is None:
    index = jnp.where(recompute, entry,
                      len(entries) + (entry if rnf else 0))
  elif the_plan.recompute or rnf:
    index = entry
  else:
    index = jnp.int32(0)
  index = jnp.asarray(index, jnp.int32)
  if static_rec:  # one side only (a static schedule, or a host decision)
    rec = bool(recompute)
    if rec or rnf:
      cases = [(e, rec) for e in entries]
      local = entry
    else:
      cases, local = [(full, False)], jnp.int32(0)
  else:
    cases, local = list(the_plan.cases), index
  if len(cases) == 1:
    return body(*cases[0]), index
  if not the_plan.executor.conditional:  # every case, then select
    outs = [body(*c) for c in cases]
    return jax.tree.map(lambda *xs: jax.lax.select_n(local, *xs),
                        *outs), index
  with conditional:
    out = jax.lax.switch(local, [lambda c=c: body(*c) for c in cases])
  return out, index


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

  * with a layer policy (``layerwise_sam``, ``sharpness_aware(policy=...)``,
    any executor): the selection (``static_selection=``, from
    ``state.policy.selection``);
  * whether this step runs the ascent (``static_recompute=``, from
    ``state.next_recompute``; ``arsam``, ``looksam``, any ``schedule=``).

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
    tx: a method of ``optax_sam`` (required for ``executor="specialize"``).
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

  def _program(self, key: tuple[tuple[str, Any], ...]):
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    update = self._update
    decided = dict(key)
    fn = self._jit(lambda p, s, *a, **kw: update(p, s, *a, **kw, **decided))
    self._cache[key] = fn
    self.compilations += 1
    value = decided.get("static_selection", decided["static_recompute"])
    if value not in self.selections:
      self.selections.append(value)
    while len(self._cache) > self._max_cache:
      self._cache.popitem(last=False)
    return fn

  def _read(self, opt_state) -> tuple[tuple[str, Any], ...]:
    from optax_sam._src import engine  # pylint: disable=g-import-not-at-top
    state = _find_state(opt_state, engine.SharpnessAwareState)
    if state is None:
      raise ValueError("SpecializedStep drives the methods of optax_sam "
                       "(a SharpnessAwareState); none was found in "
                       "opt_state.")
    if int(_first_replica(state.branch).reshape(-1)[0]) < 0:
      raise ValueError(
          "the last step's layer selection was not covered by the program "
          "it ran (update(..., static_selection=...) differed from the "
          "state's selection), so some selected layers were not "
          "perturbed. Let SpecializedStep pass static_selection.")
    key = (("static_recompute",
            bool(_first_replica(state.next_recompute).reshape(-1)[0])),)
    if isinstance(state.policy, policies_lib.PolicyState):
      key += (("static_selection", tuple(
          bool(f) for f in _first_replica(state.policy.selection))),)
    return key

  def __call__(self, params, opt_state, *args, **extra_args):
    """One step: ``((loss, aux), updates, opt_state)`` as from
    :func:`optax_sam.make_update`; ``extra_args`` go to ``tx.update``."""
    program = self._program(self._read(opt_state))
    return program(params, opt_state, *args, **extra_args)

