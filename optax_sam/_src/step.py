"""The two-pass engine behind both call paths (C1 and C2).

Every method in ``optax_sam`` asks for its gradient passes through a
:class:`GradientOracle`, and says for each pass which leaves it needs (a
static mask, see ``groups.py``). The oracle returns a gradient pytree shaped
like the parameters whose unrequested leaves are zero constants.

* **C1, drop-in** (``tx.update(grads, state, params, grad_fn=grad_fn)``): the
  caller already computed ``grads`` at ``params``; ``grad_fn(params, i)``
  computes a full gradient at other points (the convention of
  ``optax.contrib.sam``'s opaque mode, ``i`` the adversarial step index).
  :class:`GivenGradients` serves the passes from those. Unrequested leaves
  are discarded, so when the caller's gradient computation is traced in the
  same ``jit`` XLA drops their work; otherwise they were already paid for.
* **C2, loss-driven** (:func:`make_update`): :class:`LossOracle`
  differentiates ``loss_fn`` with respect to the requested leaves only, so a
  pass restricted to some layers compiles to less work (no weight gradients
  for the others, no backward pass below the lowest requested layer), and the
  unperturbed forward activations of untouched layers are shared between
  passes by XLA. ``loss`` and ``aux`` come from the clean (unperturbed) pass.

Methods call :meth:`GradientOracle.clean` once, outside any
``lax.cond``/``lax.switch``, for the pass at the unperturbed parameters, and
:meth:`GradientOracle.perturbed` for passes at other points.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from optax_sam._src import arguments
from optax_sam._src import conv as conv_lib
from optax_sam._src import gating as gating_lib

PyTree = Any
Mask = PyTree  # pytree of Python bools shaped like params, or None for all.


_GRADS_HINT = ("Pass gradients with respect to the params given to "
               "tx.update (e.g. jax.grad(loss_fn)(params, ...)).")


def _check_same_structure(tree: PyTree, params: PyTree, what: str,
                          hint: str = _GRADS_HINT) -> None:
  if jax.tree.structure(tree) != jax.tree.structure(params):
    flax = arguments.flax_variables_difference(tree, params, what)
    if flax is not None:  # flax.nnx Param wrappers on one side only
      raise ValueError(flax)
  arguments.check_same_structure(tree, params, what, hint)


def _flags(wrt: Optional[Mask], params: PyTree) -> list[bool]:
  n = jax.tree.structure(params).num_leaves
  return [True] * n if wrt is None else [bool(f) for f in jax.tree.leaves(wrt)]


def restrict(tree: PyTree, wrt: Optional[Mask]) -> PyTree:
  """Replaces the leaves of ``tree`` outside ``wrt`` by zero constants."""
  if wrt is None:
    return tree
  return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), tree, wrt)


def add_where(params: PyTree, eps: PyTree, mask: Optional[Mask]) -> PyTree:
  """``params + eps`` on the leaves in ``mask``; other leaves pass unchanged.

  Unselected leaves are the very same arrays as in ``params``, which is what
  lets XLA share the forward computation of untouched layers between the
  clean and the perturbed pass.
  """
  if mask is None:
    mask = jax.tree.map(lambda _: True, params)
  return jax.tree.map(
      lambda p, e, m: (p + e).astype(p.dtype) if m else p, params, eps, mask)


def pmean_where(tree: PyTree, mask: Optional[Mask],
                axis_name: Optional[str]) -> PyTree:
  """``lax.pmean`` over ``axis_name`` of the leaves in ``mask`` only."""
  if axis_name is None:
    return tree
  if mask is None:
    return jax.lax.pmean(tree, axis_name)
  return jax.tree.map(
      lambda x, m: jax.lax.pmean(x, axis_name) if m else x, tree, mask)


def as_local(params: PyTree, axis_name: Optional[str]) -> PyTree:
  """Marks ``params`` as varying over ``axis_name`` before differentiating.

  Inside ``jax.shard_map`` (with its default ``check_vma=True``), the gradient
  with respect to a replicated input is summed over the mapped axis by the
  transpose rule. Casting the parameters to "varying" first keeps each
  device's gradient local, as under ``jax.pmap``, so the method decides what
  is averaged (m-sharpness). A no-op without ``axis_name``.
  """
  if axis_name is None:
    return params
  cast = getattr(jax.lax, "pcast", None)
  if cast is not None:
    return jax.tree.map(lambda x: cast(x, axis_name, to="varying"), params)
  pvary = getattr(jax.lax, "pvary", None)  # older jax
  if pvary is not None:
    return jax.tree.map(lambda x: pvary(x, axis_name), params)
  return params


class GradientOracle:
  """Computes the gradient passes a sharpness-aware method asks for.

  Subclasses implement :meth:`clean_with_value` and :meth:`perturbed`.
  """

  value: Optional[tuple[Any, Any]] = None
  conditional_depth: int = 0
  _slow: Optional[bool] = None

  def slow_in_conditionals(self, params: PyTree) -> bool:
    """Whether, on the CPU, the passes this oracle would run inside a
    conditional differentiate XLA convolutions (10-40x slower there, see
    ``conv.py``); computed once per trace."""
    if self._slow is None:
      self._slow = self._runs_xla_convs(params)
    return self._slow

  def _runs_xla_convs(self, params: PyTree) -> bool:
    del params
    return False

  @contextlib.contextmanager
  def conditional(self) -> Iterator[None]:
    """Marks the passes traced inside as running in a ``lax.cond`` or
    ``lax.switch`` branch: methods wrap the conditionals they build, so that
    :class:`LossOracle` can differentiate those passes with the forward-form
    convolution backward (XLA's CPU rule is slow there)."""
    self.conditional_depth += 1
    try:
      yield
    finally:
      self.conditional_depth -= 1

  def clean_with_value(self, params: PyTree, wrt: Optional[Mask] = None,
                       gates: Optional[PyTree] = None
                       ) -> tuple[tuple[Any, Any], PyTree]:
    """``((loss, aux), grads)`` at the unperturbed ``params``, leaves in
    ``wrt``; records nothing (``loss``/``aux`` are None in C1).

    ``gates`` (a pytree of scalar bools shaped like ``params``, decided at
    run time) says which leaves' gradients are wanted within ``wrt``: C2
    skips the weight-gradient products of the others (``gating.py``); the
    gradient of a leaf whose gate is off is not meaningful (callers mask
    it). C1 computes every leaf.

    For methods that run the clean pass inside a ``lax.cond``/``lax.switch``
    branch: they return the value out of the branch and :meth:`record` it.
    """
    raise NotImplementedError

  def clean(self, params: PyTree, wrt: Optional[Mask] = None,
            gates: Optional[PyTree] = None) -> PyTree:
    """Gradient at the unperturbed ``params`` for the leaves in ``wrt``.

    Also records the pass's ``(loss, aux)``: call it outside any branch.
    """
    value, grads = self.clean_with_value(params, wrt, gates)
    self.record(*value)
    return grads

  def perturbed(self, params: PyTree, index: int = 0,
                wrt: Optional[Mask] = None,
                gates: Optional[PyTree] = None) -> PyTree:
    """Gradient at other parameters (e.g. ``w + eps``), leaves in ``wrt``
    (``gates`` as in :meth:`clean_with_value`)."""
    raise NotImplementedError

  def perturbed_with_value(self, params: PyTree, index: int = 0,
                           wrt: Optional[Mask] = None,
                           gates: Optional[PyTree] = None
                           ) -> tuple[tuple[Any, Any], PyTree]:
    """:meth:`perturbed` with the pass's ``(loss, aux)`` (None in C1), for
    methods whose only pass is at other parameters (MSAM)."""
    return (None, None), self.perturbed(params, index, wrt, gates)

  def record(self, loss: Any, aux: Any) -> None:
    """Stores the clean pass's loss and aux for :func:`make_update`."""
    self.value = (loss, aux)


class GivenGradients(GradientOracle):
  """C1: the clean gradient is given, other passes call ``grad_fn``."""

  def __init__(self, grads: PyTree,
               grad_fn: Callable[[PyTree, int], PyTree]):
    self.grads = grads
    self.grad_fn = grad_fn

  def _runs_xla_convs(self, params):
    # The user's gradient function: its backward convolutions are XLA's.
    return conv_lib.runs_convolutions(self.grad_fn, params, 0)

  def clean_with_value(self, params, wrt=None, gates=None):
    del gates  # the caller's gradients are computed already
    _check_same_structure(self.grads, params, "the gradient (updates)")
    return (None, None), restrict(self.grads, wrt)

  def perturbed(self, params, index=0, wrt=None, gates=None):
    del gates  # grad_fn computes every leaf
    grads = self.grad_fn(params, index)
    _check_same_structure(grads, params, "grad_fn's result")
    return restrict(grads, wrt)


class LossOracle(GradientOracle):
  """C2: differentiates ``loss_fn(params, *args)`` w.r.t. requested leaves."""

  def __init__(self, loss_fn: Callable[..., Any], has_aux: bool,
               args: tuple[Any, ...],
               branch_loss_fn: Optional[Callable[..., Any]] = None):
    self.loss_fn = loss_fn
    self.has_aux = has_aux
    self.args = args
    # The loss differentiated inside conditional branches (None: loss_fn).
    self.branch_loss_fn = branch_loss_fn
    # Whether a transformation asked for any gradient pass: tells "tx ignored
    # grad_fn" apart from an error raised inside a pass (e.g. by loss_fn).
    self.requested = False

  def _value_and_grad(self, params, wrt, gates=None):
    self.requested = True
    leaves, treedef = jax.tree.flatten(params)
    flags = _flags(wrt, params)
    if len(flags) != len(leaves):
      raise ValueError("the mask does not match params' leaves.")
    chosen = [i for i, f in enumerate(flags) if f]
    if not chosen:
      raise ValueError("a gradient pass must request at least one leaf.")

    loss_fn = (self.branch_loss_fn if self.conditional_depth
               and self.branch_loss_fn is not None else self.loss_fn)
    if gates is not None:
      # The products gated by leaf (their convolutions in forward form).
      _check_same_structure(gates, params, "gates", hint="")
      loss_fn = gating_lib.gated(self.loss_fn, gates)

    def partial_loss(selected):
      full = list(leaves)
      for i, x in zip(chosen, selected):
        full[i] = x
      return loss_fn(jax.tree.unflatten(treedef, full), *self.args)

    out, g_sel = jax.value_and_grad(partial_loss, has_aux=self.has_aux)(
        [leaves[i] for i in chosen])
    grads = [jnp.zeros_like(x) for x in leaves]
    for i, g in zip(chosen, g_sel):
      grads[i] = g
    loss, aux = out if self.has_aux else (out, None)
    return loss, aux, jax.tree.unflatten(treedef, grads)

  def _runs_xla_convs(self, params):
    if self.branch_loss_fn is not None:  # branches use the forward form
      return False
    return conv_lib.runs_convolutions(self.loss_fn, params, *self.args)

  def clean_with_value(self, params, wrt=None, gates=None):
    loss, aux, grads = self._value_and_grad(params, wrt, gates)
    return (loss, aux), grads

  def perturbed(self, params, index=0, wrt=None, gates=None):
    del index
    return self._value_and_grad(params, wrt, gates)[2]

  def perturbed_with_value(self, params, index=0, wrt=None, gates=None):
    del index
    loss, aux, grads = self._value_and_grad(params, wrt, gates)
    return (loss, aux), grads


def as_oracle(updates: Optional[PyTree],
              grad_fn: Optional[Callable[..., Any]]) -> GradientOracle:
  """The oracle for one ``update`` call (C2 passes one; C1 gets wrapped)."""
  if isinstance(grad_fn, GradientOracle):
    return grad_fn
  if grad_fn is None:
    raise ValueError(
        "this sharpness-aware transformation needs grad_fn: call "
        "tx.update(grads, state, params, grad_fn=grad_fn) with "
        "grad_fn(params, i) -> grads, or use optax_sam.make_update(tx, "
        "loss_fn) to let the library run the gradient passes.")
  if updates is None:
    raise ValueError("updates (the gradient at params) is None: pass the "
                     "gradient, or use optax_sam.make_update.")
  return GivenGradients(updates, grad_fn)


_NOT_DRIVEN = (
    "tx did not run the loss-driven gradient passes: make_update needs a "
    "transformation from optax_sam; wrap a plain optax optimizer with "
    "optax_sam.plain(optimizer), and use optax_sam.sam(optimizer, rho) in "
    "place of optax.contrib.sam.")


def _holds_optax_sam_state(opt_state: Any) -> bool:
  """Whether any node of ``opt_state`` is a state class of ``optax_sam``
  (also inside ``inject_hyperparams``, ``chain`` and other wrappers)."""
  found = []

  def visit(node):
    if type(node).__module__.startswith("optax_sam."):
      found.append(node)
    return bool(found)

  jax.tree_util.tree_flatten(opt_state, is_leaf=visit)
  return bool(found)


_APPLY_IF_FINITE = (
    "make_update cannot drive optax.apply_if_finite(tx, ...): it tests the "
    "gradient passed to update, and in C2 there is none (the passes run "
    "inside tx). Put it inside instead, as the base optimizer: "
    "optax_sam.sam(optax.apply_if_finite(optax.sgd(0.1), 3)) skips every "
    "step whose descent gradient is not finite (docs/guide.md: "
    "'Skipping bad steps').")


def make_update(
    tx: optax.GradientTransformationExtraArgs,
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
    *,
    conv_backward: conv_lib.ConvBackward = "auto",
) -> Callable[..., tuple[tuple[Any, Any], PyTree, optax.OptState]]:
  """Builds a loss-driven training step (call path C2).

  The library runs every gradient pass itself, differentiating only with
  respect to the leaves each pass needs, so a restricted pass costs less in
  the compiled program. Wrap the result in ``jax.jit`` (or ``jax.pmap`` /
  ``jax.shard_map`` when ``tx`` has an ``axis_name``)::

    step = jax.jit(optax_sam.make_update(tx, loss_fn))
    (loss, aux), updates, opt_state = step(params, opt_state, x, y)
    params = optax.apply_updates(params, updates)

  Args:
    tx: a transformation from ``optax_sam`` (possibly wrapped by
      ``optax.inject_hyperparams``). A plain optax optimizer must be wrapped
      with :func:`optax_sam.plain` to be driven by a loss.
    loss_fn: ``loss_fn(params, *args) -> loss``, or ``-> (loss, aux)`` when
      ``has_aux`` is True.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    conv_backward: how the gradients of the convolutions ``loss_fn`` runs
      are computed. ``"auto"`` (default): on the CPU, the passes a method
      runs inside its ``lax.cond``/``lax.switch`` branches (the ``switch``
      executor, ARSAM's and LookSAM's recompute branch) rewrite them as
      forward convolutions (:func:`optax_sam.forward_form_convs`), which XLA
      runs there as fast as outside (its own rule is 10-40x slower inside a
      conditional); every other pass, and every pass on GPU/TPU, keeps XLA's
      rule. ``"forward"``: every pass in forward form. ``"xla"``: never.
      Values and gradients are the same either way, up to summation order.

  Returns:
    ``step(params, opt_state, *args, **extra_args) -> ((loss, aux), updates,
    opt_state)`` where ``loss`` and ``aux`` come from the pass at the
    unperturbed parameters (``aux`` is None when ``has_aux`` is False).
    Positional ``args`` go to ``loss_fn``; keyword ``extra_args`` go to
    ``tx.update`` (and on to the base optimizer, e.g. ``value=``).

  Raises:
    TypeError: at the first step, for ``tx = optax.apply_if_finite(...)``
      around a method: that wrapper tests the ``updates`` argument, which
      is None here, so it could never skip a step. Use it as the method's
      base optimizer instead (``optax_sam.sam(optax.apply_if_finite(opt,
      n))``), which tests the descent gradient.
  """
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable, got {loss_fn!r}.")
  if not hasattr(tx, "update"):
    raise TypeError(f"tx must be an optax transformation, got {tx!r}.")
  conv_lib.resolve_conv_backward(conv_backward)  # validates early
  rewritten = conv_lib.forward_form_convs(loss_fn)

  def step(params, opt_state, *args, **extra_args):
    if isinstance(opt_state, optax.ApplyIfFiniteState):
      raise TypeError(_APPLY_IF_FINITE)
    if conv_backward == "forward":
      oracle = LossOracle(rewritten, has_aux, args, rewritten)
    else:
      in_branches = conv_lib.resolve_conv_backward(conv_backward)
      oracle = LossOracle(loss_fn, has_aux, args,
                          rewritten if in_branches else None)
    try:
      updates, opt_state = tx.update(None, opt_state, params, grad_fn=oracle,
                                     **extra_args)
    except (TypeError, AttributeError, ValueError) as e:
      # Only a transformation that never asked for a pass and is not from
      # optax_sam (a plain optax optimizer or optax.contrib.sam choking on
      # updates=None) gets the hint; an error raised inside a pass (a bug in
      # loss_fn, a non-scalar loss, a has_aux mismatch, integer leaves) or
      # by a method's own checks is the user's to see as it is.
      if not oracle.requested and not _holds_optax_sam_state(opt_state):
        raise TypeError(_NOT_DRIVEN) from e
      raise
    if oracle.value is None:
      raise TypeError(_NOT_DRIVEN)
    return oracle.value, updates, opt_state

  return step
