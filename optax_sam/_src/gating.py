"""Gated gradients: weight-gradient products skipped at run time.

A method that picks a *random* subset of parameter tensors every step
(SL-SAM) cannot save work with a bounded menu of static subsets: the lowest
selected tensor is almost always near the input, so the cheapest static
superset is nearly the whole model. PyTorch saves by not computing the
weight gradient of a tensor with ``requires_grad=False``. This module does
the same inside one jitted program, for any ``loss_fn``, without editing the
model: :func:`gated` traces ``loss_fn(params, *args)`` and evaluates its
program again with every matrix product (``dot_general``: ``nn.Dense``,
``nn.DenseGeneral``, ``einsum``, attention) and every convolution given a
backward pass in which

* the cotangent of an operand that depends on parameter leaves is computed
  under ``lax.cond(any(gate of those leaves), ...)``, and is zero otherwise.
  A weight operand depends on its own leaf only, so its weight-gradient
  product runs only when that leaf is selected; an activation operand
  depends on every leaf below it, so the backward pass stops below the
  lowest selected leaf;
* an operand that depends on no parameter gets no cotangent at all.

On CPU and GPU a ``lax.cond`` runs only the taken branch, so a leaf whose
gate is off costs no weight-gradient product. Convolutions use the
forward-form backward of ``conv.py`` inside those conditionals (XLA's own
rule is 10-40x slower inside one on the CPU); the ones it does not cover
keep XLA's rule, ungated. Values are unchanged, and the gradient of every
leaf whose gate is on equals ``jax.grad``'s up to summation order. The
gradient of a leaf whose gate is off is *not* meaningful (it may be zero or
partial): callers mask it (the engine zeros it).

What is not gated (computed as usual, correct): element-wise parameters
(biases, normalization scales: their gradients are cheap reductions), and
products inside ``lax.scan``/``while``/``cond``, custom derivatives and
``jax.checkpoint``. Under ``vmap`` a ``lax.cond`` becomes a select and both
sides are computed (correct, no saving).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.extend.core import primitives as jex_prims

from optax_sam._src import conv as conv_lib

PyTree = Any
# A gate: True/None (always computed), False (never), or a traced bool.
Gate = Union[None, bool, jax.Array]
_EMPTY: frozenset = frozenset()


def _mode(gate: Gate) -> str:
  if gate is None or gate is True:
    return "on"
  if gate is False:
    return "off"
  return "gated"


def _zeros(like: jax.Array, sources: Sequence[jax.Array] = ()) -> jax.Array:
  """Zeros shaped and typed like ``like``; inside ``shard_map`` also varying
  over the mesh axes of ``like`` and ``sources`` (one scalar of each enters
  through a select that always picks 0, so that types match)."""
  z = jnp.zeros(like.shape, like.dtype)
  for x in (like, *sources):
    if x.size:
      z = z + jnp.where(True, 0, x.reshape(-1)[0]).astype(like.dtype)
  return z


def _maybe(compute: Callable[[], jax.Array], mode: str, gate: jax.Array,
           like: jax.Array, sources: Sequence[jax.Array]) -> jax.Array:
  """``compute()`` when the gate is on, zeros otherwise (a ``lax.cond``);
  ``sources`` are the arrays ``compute`` reads."""
  if mode == "on":
    return compute()
  if mode == "off":
    return _zeros(like)
  return lax.cond(gate > 0, lambda: compute().astype(like.dtype),
                  lambda: _zeros(like, sources))


def _gate_value(gate: Gate) -> jax.Array:
  if isinstance(gate, bool) or gate is None:
    return jnp.float32(1.0 if gate is not False else 0.0)
  return jnp.asarray(gate, jnp.float32)


def _gated_binary(forward: Callable[[jax.Array, jax.Array], jax.Array],
                  grads: Callable[..., tuple[Callable[[], jax.Array],
                                             Callable[[], jax.Array]]],
                  lhs: jax.Array, rhs: jax.Array, gl: Gate, gr: Gate
                  ) -> jax.Array:
  """``forward(lhs, rhs)`` whose two cotangents are computed under gates.

  ``grads(lhs, rhs, ct)`` returns two thunks, the lhs and the rhs
  cotangent.
  """
  ml, mr = _mode(gl), _mode(gr)
  if ml == "on" and mr == "on":
    return forward(lhs, rhs)

  @jax.custom_vjp
  def op(a, b, ga, gb):
    del ga, gb
    return forward(a, b)

  def fwd(a, b, ga, gb):
    return forward(a, b), (a, b, ga, gb)

  def bwd(res, ct):
    a, b, ga, gb = res
    da, db = grads(a, b, ct)
    return (_maybe(da, ml, ga, a, (b, ct)), _maybe(db, mr, gb, b, (a, ct)),
            _zeros(ga), _zeros(gb))

  op.defvjp(fwd, bwd)
  return op(lhs, rhs, _gate_value(gl), _gate_value(gr))


def _dot(eqn, lhs, rhs, gl: Gate, gr: Gate) -> jax.Array:
  bind = lambda a, b: conv_lib._bind(eqn, [a, b])[0]  # pylint: disable=protected-access

  def grads(a, b, ct):
    return (lambda: jax.vjp(lambda x: bind(x, b), a)[1](ct)[0],
            lambda: jax.vjp(lambda y: bind(a, y), b)[1](ct)[0])

  return _gated_binary(bind, grads, lhs, rhs, gl, gr)


def _conv(eqn, lhs, rhs, gl: Gate, gr: Gate) -> jax.Array:
  p = eqn.params
  plan, _ = conv_lib._plan(  # pylint: disable=protected-access
      lhs.shape, rhs.shape, p["window_strides"], p["padding"],
      p["lhs_dilation"], p["rhs_dilation"], p["dimension_numbers"],
      p["feature_group_count"], p["batch_group_count"], p["precision"],
      p["preferred_element_type"])
  if (plan is None or p.get("out_sharding") is not None
      or not (jnp.issubdtype(lhs.dtype, jnp.floating)
              and lhs.dtype == rhs.dtype)):
    return conv_lib._bind(eqn, [lhs, rhs])[0]  # pylint: disable=protected-access
  cfg = plan.cfg
  t = conv_lib._transpose  # pylint: disable=protected-access

  def forward(x, w):
    return conv_lib._canonical_conv(x, w, cfg)  # pylint: disable=protected-access

  def grads(x, w, dy):
    return (lambda: conv_lib._input_grad(cfg, x, w, dy),  # pylint: disable=protected-access
            lambda: conv_lib._weight_grad(cfg, x, w, dy))  # pylint: disable=protected-access

  out = _gated_binary(forward, grads, t(lhs, plan.lhs_perm),
                      t(rhs, plan.rhs_perm), gl, gr)
  return t(out, plan.out_perm)


class _Gates:
  """The gate of a set of parameter leaves: on when any leaf's is on."""

  def __init__(self, leaf_gates: Sequence[Gate]):
    self.leaf_gates = list(leaf_gates)
    self.cache: dict[frozenset, Gate] = {}
    self.gated_ops = 0

  def of(self, deps: frozenset) -> Gate:
    if deps in self.cache:
      return self.cache[deps]
    gates = [self.leaf_gates[i] for i in sorted(deps)]
    if not gates or all(g is False for g in gates):
      out: Gate = False
    elif any(g is None or g is True for g in gates):
      out = None
    else:
      traced = [g for g in gates if g is not False]
      out = traced[0] if len(traced) == 1 else jnp.any(
          jnp.stack([jnp.asarray(g, jnp.bool_) for g in traced]))
    self.cache[deps] = out
    return out


def _eval(jaxpr, consts: Sequence[Any], args: Sequence[Any],
          arg_deps: Sequence[frozenset], gates: _Gates
          ) -> tuple[list[Any], list[frozenset]]:
  """Evaluates ``jaxpr`` with gated products; returns outputs and the leaf
  dependencies of each output."""
  env: dict[Any, Any] = {}
  deps: dict[Any, frozenset] = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def dep(v):
    return _EMPTY if isinstance(v, jex_core.Literal) else deps.get(v, _EMPTY)

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x, d in zip(jaxpr.invars, args, arg_deps):
    env[v], deps[v] = x, d
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    indeps = [dep(v) for v in eqn.invars]
    prim = eqn.primitive
    outdeps = None
    if prim is jex_prims.dot_general_p:
      outvals = [_dot(eqn, *invals, gates.of(indeps[0]), gates.of(indeps[1]))]
      gates.gated_ops += 1
    elif prim is jex_prims.conv_general_dilated_p:
      outvals = [_conv(eqn, *invals, gates.of(indeps[0]),
                       gates.of(indeps[1]))]
      gates.gated_ops += 1
    elif prim is jex_prims.jit_p:
      inner = eqn.params["jaxpr"]
      outvals, outdeps = _eval(inner.jaxpr, inner.consts, invals, indeps,
                               gates)
    else:
      outvals = conv_lib._bind(eqn, invals)  # pylint: disable=protected-access
    if outdeps is None:
      union = frozenset().union(*indeps) if indeps else _EMPTY
      outdeps = [union] * len(eqn.outvars)
    for v, x, d in zip(eqn.outvars, outvals, outdeps):
      if not isinstance(v, jex_core.DropVar):
        env[v], deps[v] = x, d
  return [read(v) for v in jaxpr.outvars], [dep(v) for v in jaxpr.outvars]


def _arg_deps(num_params: int, num_args: int) -> list[frozenset]:
  """The leaf dependencies of a traced program's inputs: the first
  ``num_params`` are the parameter leaves, the others depend on none."""
  return ([frozenset([i]) for i in range(num_params)]
          + [_EMPTY] * (num_args - num_params))


def gated(fn: Callable[..., Any], gates: PyTree) -> Callable[..., Any]:
  """``fn(params, *args)`` whose parameter gradients are gated at run time.

  Args:
    fn: ``fn(params, *args) -> out``, any JAX-traceable function (a loss).
    gates: a pytree shaped like ``params`` with one gate per leaf: a scalar
      bool array (traced: decided at run time), ``True``/``None`` (always
      computed) or ``False`` (never).

  Returns:
    A function with ``fn``'s signature and values; under ``jax.grad``, the
    products that only serve leaves whose gate is off are skipped (see the
    module docstring). The gradient of a gated-off leaf is not meaningful.
  """

  @functools.wraps(fn)
  def wrapped(params, *args):
    p_leaves, p_def = jax.tree.flatten(params)
    try:
      # Up to params' structure: a None gate of an array leaf is a leaf;
      # a None subtree of params (no leaf) matches gates' None there.
      g_leaves = p_def.flatten_up_to(gates)
    except (ValueError, TypeError):
      g_leaves = jax.tree.leaves(gates, is_leaf=lambda x: x is None)
    if len(g_leaves) != len(p_leaves):
      raise ValueError(f"gates must have one entry per parameter leaf: got "
                       f"{len(g_leaves)} for {len(p_leaves)} leaves.")
    closed, out_shape, dyn = conv_lib._trace(fn, (params,) + args, {})  # pylint: disable=protected-access
    n = len(p_leaves)
    if len(dyn) < n or any(a is not b for a, b in zip(dyn, p_leaves)):
      return fn(params, *args)  # a leaf is not an array: nothing to gate
    out, _ = _eval(closed.jaxpr, closed.consts, dyn, _arg_deps(n, len(dyn)),
                   _Gates(g_leaves))
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped


def count_gated_products(fn: Callable[..., Any], params: PyTree,
                         *args: Any) -> int:
  """How many matrix products and convolutions :func:`gated` would gate in
  ``fn(params, *args)`` (traced, not run); 0 means no saving is possible."""
  closed, _, dyn = conv_lib._trace(fn, (params,) + args, {})  # pylint: disable=protected-access
  n = len(jax.tree.leaves(params))
  gates = _Gates([jnp.bool_(True)] * n)
  deps = _arg_deps(n, len(dyn))
  jax.eval_shape(lambda *a: _eval(closed.jaxpr, closed.consts, a, deps,
                                  gates)[0], *dyn)
  return gates.gated_ops

