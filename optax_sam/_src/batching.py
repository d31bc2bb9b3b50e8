"""Batch-level pieces for C2 methods: per-example losses and micro-batches.

Some methods act on the examples of a batch, which only the loss-driven call
path (C2, :func:`optax_sam.make_update`) can reach: the library holds
``loss_fn`` and its arguments there. Conventions:

* the **batched arguments** of ``loss_fn(params, *args)`` are the positional
  ``args`` named by ``batch_argnums`` (default: all of them); every array
  leaf of those has the batch as its leading axis (size ``B``). Others
  (e.g. BatchNorm statistics) are passed unchanged;
* a **per-example loss** returns a vector of shape ``[B]`` (or ``(losses,
  aux)`` with ``has_aux=True``) instead of the scalar mean;
  :func:`per_example_loss` builds one from a mean loss by ``vmap`` over
  single examples (valid when examples do not interact: no BatchNorm in
  training mode).

Pieces: :func:`per_example_loss`, :func:`take_examples` (a subset of the
batch), :func:`split_batch` (micro-batches), and :func:`per_micro_batch`,
which runs a sharpness-aware engine's ascent on each micro-batch of ``m``
examples by ``vmap`` (m-sharpness) and averages their descent gradients.

References:
  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021
  (m-sharpness).

  Baek, Kolter and Raghunathan, `Why is SAM Robust to Label Noise?
  <https://arxiv.org/abs/2405.03676>`_, ICLR 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import step as step_lib

PyTree = Any
ArgNums = Optional[Sequence[int]]


def _argnums(args: tuple[Any, ...], batch_argnums: ArgNums) -> list[int]:
  if batch_argnums is None:
    return list(range(len(args)))
  out = [int(i) % len(args) if len(args) else int(i) for i in batch_argnums]
  for i in out:
    if not 0 <= i < len(args):
      raise ValueError(f"batch_argnums {tuple(batch_argnums)} out of range "
                       f"for {len(args)} arguments.")
  return out


def batch_size(args: tuple[Any, ...], batch_argnums: ArgNums = None) -> int:
  """``B``, the leading size shared by every array leaf of the batched
  arguments; ``ValueError`` when they disagree or there are none."""
  sizes = set()
  for i in _argnums(args, batch_argnums):
    for x in jax.tree.leaves(args[i]):
      shape = np.shape(x)
      if not shape:
        raise ValueError(
            f"argument {i} of loss_fn (after params) holds a scalar, which has "
            "no batch axis: pass batch_argnums=(...) naming the batched "
            "arguments only.")
      sizes.add(int(shape[0]))
  if len(sizes) != 1:
    raise ValueError(
        "the batched arguments of loss_fn must share their leading (batch) "
        f"size, got sizes {sorted(sizes)}: pass batch_argnums=(...) naming "
        "the batched arguments only." if sizes else
        "loss_fn has no batched argument (batch_argnums names none).")
  return sizes.pop()


def take_examples(args: tuple[Any, ...], index: jax.Array,
                  batch_argnums: ArgNums = None) -> tuple[Any, ...]:
  """The examples ``index`` (int vector) of the batched arguments."""
  nums = set(_argnums(args, batch_argnums))
  return tuple(jax.tree.map(lambda x: jnp.take(x, index, axis=0), a)
               if i in nums else a for i, a in enumerate(args))


def split_batch(args: tuple[Any, ...], m: int,
                batch_argnums: ArgNums = None) -> tuple[Any, ...]:
  """Each batched leaf ``(B, ...) -> (B // m, m, ...)``: micro-batch ``j``
  holds examples ``j m ... j m + m - 1``. Unbatched arguments are unchanged
  (``vmap`` them with ``in_axes=None``)."""
  b = batch_size(args, batch_argnums)
  if b % m:
    raise ValueError(f"the batch size {b} is not a multiple of m={m}.")
  nums = set(_argnums(args, batch_argnums))
  return tuple(jax.tree.map(lambda x: jnp.reshape(
      x, (b // m, m) + tuple(np.shape(x)[1:])), a) if i in nums else a
               for i, a in enumerate(args))


def per_example_loss(loss_fn: Callable[..., Any], has_aux: bool = False,
                     batch_argnums: ArgNums = None) -> Callable[..., Any]:
  """``loss_fn`` (a mean over examples) -> per-example losses ``[B]``.

  Each example is run as a batch of one (``vmap`` over the batched
  arguments), so the result is right for losses whose examples do not
  interact (not for BatchNorm in training mode: give a per-example loss of
  your own there). With ``has_aux`` the aux gets a leading ``[B]`` axis.
  """
  def fn(params, *args):
    nums = set(_argnums(args, batch_argnums))
    axes = tuple(0 if i in nums else None for i in range(len(args)))

    def one(*example):
      example = tuple(jax.tree.map(lambda x: x[None], a) if i in nums else a
                      for i, a in enumerate(example))
      return loss_fn(params, *example)

    return jax.vmap(one, in_axes=axes)(*args)

  return fn


def per_micro_batch(make: Callable[[optax.GradientTransformation],
                                   optax.GradientTransformationExtraArgs],
                    optimizer: optax.GradientTransformation, m: int, *,
                    batch_argnums: ArgNums = None, loop: str = "vmap"
                    ) -> optax.GradientTransformationExtraArgs:
  """m-sharpness: the ascent and perturbed pass per micro-batch of ``m``.

  ``make(base)`` builds the engine (e.g. ``lambda b: sharpness_aware(b,
  perturbation)``); it is run, with ``optax.identity()`` as its base, on each
  micro-batch of ``m`` examples under one ``vmap`` (its own clean gradient,
  its own ``eps``, its own perturbed gradient), the descent gradients are
  averaged over the micro-batches and ``optimizer`` consumes the average.
  ``m`` equal to the batch size is the engine on the whole batch.

  ``loop="vmap"`` (default) runs the micro-batches side by side: each has
  its own copy of the perturbed parameters, and the dense layers become
  batched products (``B // m`` copies of the weights: memory-bound for
  small ``m``). ``loop="map"`` runs them one after the other
  (``lax.scan``, the descent summed in its carry): one copy of the weights
  at a time, ordinary products on ``m`` rows; same FLOPs and results (up
  to summation order).

  C2 only (the batch is split by the library). The C2 loss is the mean of
  the micro-batches' clean losses; the aux has a leading micro-batch axis
  ``[B // m]``. The state is the engine's
  (:class:`optax_sam.SharpnessAwareState`; the per-step statistics are the
  first micro-batch's, ``finite`` covers them all) with ``opt_state`` the
  base optimizer's.
  """
  from optax_sam._src import engine as engine_lib  # pylint: disable=g-import-not-at-top
  m = args_lib.check_int(m, "m", 1)
  if loop not in ("vmap", "map"):
    raise ValueError(f"loop must be 'vmap' or 'map', got {loop!r}.")
  optimizer = engine_lib.as_extra_args(optimizer)
  inner = make(optax.identity())

  def init_fn(params):
    return inner.init(params)._replace(opt_state=optimizer.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del updates
    if not isinstance(grad_fn, step_lib.LossOracle):
      raise ValueError(
          "m-sharpness (m=...) needs the loss-driven call path: "
          "optax_sam.make_update(tx, loss_fn); a C1 grad_fn(params, i) "
          "cannot be evaluated on micro-batches of the caller's batch.")
    if params is None:
      raise ValueError("m-sharpness needs params.")
    grad_fn.requested = True
    micro = split_batch(grad_fn.args, m, batch_argnums)
    nums = set(_argnums(grad_fn.args, batch_argnums))
    axes = tuple(0 if i in nums else None for i in range(len(micro)))
    inner_state = state._replace(opt_state=optax.EmptyState())

    def one(*args_j):
      oracle = step_lib.LossOracle(grad_fn.loss_fn, grad_fn.has_aux, args_j,
                                   grad_fn.branch_loss_fn)
      # A loop body is a conditional for XLA's CPU convolution backward (as
      # slow there): its passes take the branch rule (make_update's
      # conv_backward), as a lax.cond branch's do.
      oracle.conditional_depth = grad_fn.conditional_depth + (
          loop == "map")
      descent, st = inner.update(None, inner_state, params, grad_fn=oracle)
      loss, aux = oracle.value
      return descent, st, loss, aux

    if loop == "vmap":
      descent, states, losses, aux = jax.vmap(one, in_axes=axes)(*micro)
      descent = jax.tree.map(
          lambda d: jnp.mean(d.astype(jnp.float32), axis=0).astype(d.dtype),
          descent)
    else:  # a scan whose carry sums the descent (nothing params-sized stacked)
      batched = tuple(a for i, a in enumerate(micro) if i in nums)
      count = jax.tree.leaves(batched)[0].shape[0]

      def body(total, xs):
        it = iter(xs)
        d, st, loss, aux_j = one(*(next(it) if i in nums else a
                                   for i, a in enumerate(micro)))
        total = jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total,
                             d)
        return total, (st, loss, aux_j)

      zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32),
                           params)
      total, (states, losses, aux) = jax.lax.scan(body, zeros, batched)
      descent = jax.tree.map(lambda t, x: (t / count).astype(x.dtype), total,
                             params)
    first = jax.tree.map(lambda x: x[0], states)
    new_updates, opt_state = optimizer.update(descent, state.opt_state,
                                              params, **extra_args)
    grad_fn.record(jnp.mean(losses), aux)
    finite = (jnp.all(states.finite) & engine_lib.all_finite(descent)
              & engine_lib.all_finite(new_updates))
    return new_updates, first._replace(opt_state=opt_state, finite=finite)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
