"""ESAM: efficient SAM by stochastic weight perturbation and data selection.

Two independent savings on SAM's step, each with its own knob:

* **stochastic weight perturbation** (``beta``): each parameter tensor takes
  part in the ascent with probability ``beta``, drawn independently every
  step. The clean pass computes the gradients of the drawn tensors only,
  and ``eps = (rho / beta) g_S / ||g_S||`` on them (0 on the others); every
  tensor then descends along the gradient at ``w + eps``;
* **sharpness-sensitive data selection** (``gamma``): the per-example losses
  at ``w`` (from the clean pass) and at ``w + eps`` (one forward pass) give
  each example's sharpness ``l_i(w + eps) - l_i(w)``; the descent gradient
  is that of the mean loss at ``w + eps`` over the ``floor(gamma B)``
  examples where it is largest (at least one), so the perturbed backward
  pass runs on that subset only.

``beta = gamma = 1`` is SAM. This is the authors' code (``ESAM`` in
``github.com/dydjw9/Efficient_SAM/utils/Esam.py``), where it and the paper
differ: the draw is per tensor (the code's ``requires_grad``) not per scalar
weight, the radius is divided by ``beta`` after normalizing over the drawn
tensors, and the very first step perturbs every tensor (the code's flags
start on). The code's ``instance_sharpness > cutoff`` keeps the top
``int(gamma B)`` examples minus ties at the cutoff (one fewer without ties);
here exactly the top ``int(gamma B)`` (``lax.top_k``). Defaults are the
code's scripts' ``beta = gamma = 0.5``, ``rho = 0.05``.

The C2 contract for data selection (``gamma < 1``): ``loss_fn`` returns the
**per-example losses** ``[B]`` (or ``(losses, aux)`` with ``has_aux``)
instead of their mean; the batched arguments (``batch_argnums``, default all
positional arguments after params) are indexed along their leading axis to
take the subset. :func:`optax_sam.per_example_loss` turns a mean loss over
independent examples into one. The C2 loss is the mean at ``w``. A scalar
loss raises ``ValueError``; C1 (``grad_fn``) cannot select data and raises
too (``beta`` alone works in C1, as a mask on the given gradients).

Executor: the drawn subset changes every step, so the default is the
``gated`` executor (C2), whose clean pass skips the weight-gradient products
of the tensors not drawn at run time (see :func:`optax_sam.slsam`).

References:
  Du et al., `Efficient Sharpness-aware Minimization for Improved Training
  of Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_sam._src import arguments as args_lib
from optax_sam._src import batching as batching_lib
from optax_sam._src import engine
from optax_sam._src import executors as executors_lib
from optax_sam._src import groups as groups_lib
from optax_sam._src import perturb as perturb_lib
from optax_sam._src import policies as policies_lib
from optax_sam._src import step as step_lib
from optax_sam._src.slsam import per_leaf_label

PyTree = Any

_NEEDS_PER_EXAMPLE = (
    "ESAM's data selection (gamma < 1) needs per-example losses: loss_fn must "
    "return a vector of shape [batch] (or (losses, aux) with has_aux=True), "
    "not their mean; wrap a mean loss over independent examples with "
    "optax_sam.per_example_loss(loss_fn), or use gamma=1.")
_NEEDS_C2 = (
    "ESAM's data selection (gamma < 1) needs the loss-driven call path, "
    "optax_sam.make_update(tx, per_example_loss_fn): a C1 grad_fn cannot "
    "evaluate the loss on a subset of the batch. (gamma=1 works in C1.)")


def bernoulli(beta: float, seed: Optional[args_lib.SeedOrKey] = None
              ) -> policies_lib.Policy:
  """Each group drawn independently with probability ``beta`` every step
  (every group at the first step; an empty draw takes one group uniformly
  at random)."""
  beta = args_lib.check_number(beta, "beta", 0.0, 1.0, low_open=True)

  def draw(key, num_groups):
    k1, k2 = jax.random.split(key)
    flags = jax.random.bernoulli(k1, beta, (num_groups,))
    one = jnp.arange(num_groups) == jax.random.randint(k2, (), 0, num_groups)
    return jnp.where(jnp.any(flags), flags, one)

  def init(num_groups, key=None):
    key = args_lib.as_key(seed if key is None else key)
    return policies_lib.PolicyState(
        jnp.ones([num_groups], bool), jnp.zeros([], jnp.int32), key,
        jnp.zeros([num_groups], jnp.float32))

  def update(state, stats):
    key, sub = jax.random.split(state.key)
    return state._replace(selection=draw(sub, stats.sq_norms.shape[0]),
                          count=optax.safe_increment(state.count), key=key)

  return policies_lib.Policy(init, update, lambda step: True, seed)


class _SelectingOracle(step_lib.LossOracle):
  """C2 passes on per-example losses: the clean pass keeps ``l_i(w)``; the
  perturbed pass takes the gradient on the examples that rose most."""

  def __init__(self, outer: step_lib.LossOracle, gamma: float,
               batch_argnums, from_mean: bool = False):
    self.outer = outer
    self.gamma = gamma
    self.batch_argnums = batch_argnums
    self.before = None

    def mean_of(fn):
      if fn is None:
        return None

      per = (batching_lib.per_example_loss(fn, outer.has_aux, batch_argnums)
             if from_mean else fn)

      def loss(params, *args):
        out = per(params, *args)
        losses, aux = out if outer.has_aux else (out, None)
        if jnp.ndim(losses) != 1:
          raise ValueError(_NEEDS_PER_EXAMPLE + f" Got a loss of shape "
                           f"{jnp.shape(losses)}.")
        return jnp.mean(losses), (aux, losses)

      return loss

    super().__init__(mean_of(outer.loss_fn), True, outer.args,
                     mean_of(outer.branch_loss_fn))

  def clean_with_value(self, params, wrt=None, gates=None):
    self.outer.requested = True
    loss, (aux, losses), grads = self._value_and_grad(params, wrt, gates)
    self.before = losses
    return (loss, aux), grads

  def perturbed(self, params, index=0, wrt=None, gates=None):
    del index
    if self.before is None:
      raise ValueError("ESAM's data selection needs the clean pass first.")
    after = jax.lax.stop_gradient(self.loss_fn(params, *self.args)[1][1])
    num = after.shape[0]
    k = max(1, int(np.floor(self.gamma * num)))
    _, top = jax.lax.top_k(after - self.before, k)
    sub = step_lib.LossOracle(
        self.loss_fn, True,
        batching_lib.take_examples(self.args, top, self.batch_argnums),
        self.branch_loss_fn)
    sub.conditional_depth = self.conditional_depth
    return sub._value_and_grad(params, wrt, gates)[2]  # pylint: disable=protected-access

  def perturbed_with_value(self, params, index=0, wrt=None, gates=None):
    return (None, None), self.perturbed(params, index, wrt, gates)

  def record(self, loss, aux):
    self.outer.record(loss, aux)


def esam(
    optimizer: optax.GradientTransformation,
    rho: perturb_lib.ScalarOrSchedule = 0.05,
    beta: float = 0.5,
    gamma: float = 0.5,
    *,
    batch_argnums: Optional[tuple[int, ...]] = None,
    per_example_from_mean: bool = False,
    labels: groups_lib.Labels = None,
    executor: Union[str, executors_lib.Executor, None] = "gated",
    seed: Optional[args_lib.SeedOrKey] = None,
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """ESAM (module docstring): SWP with ``beta``, data selection with ``gamma``.

  Example (C2)::

    def losses(params, x, y):  # per-example losses, shape [B]
      return optax.softmax_cross_entropy_with_integer_labels(
          model.apply(params, x), y)
    tx = optax_sam.esam(optax.sgd(0.05, momentum=0.9), rho=0.05, beta=0.5,
                        gamma=0.5)
    step = jax.jit(optax_sam.make_update(tx, losses))
    (mean_loss, _), updates, opt_state = step(params, opt_state, x, y)

  Args:
    optimizer: the base optimizer.
    rho: the radius, > 0, or a schedule (divided by ``beta``).
    beta: probability that a tensor takes part in the ascent, in ``(0, 1]``.
    gamma: fraction of the batch the descent is computed on, in ``(0, 1]``
      (< 1 needs per-example losses, see the module docstring).
    batch_argnums: the positional arguments of ``loss_fn`` after params that
      hold the batch (default all), for ``gamma < 1``.
    per_example_from_mean: ``loss_fn`` returns the mean loss and ESAM takes
      the per-example losses from it by :func:`optax_sam.per_example_loss`
      (``vmap`` over single examples: right only when examples do not
      interact, e.g. no BatchNorm in training mode). Default False: a
      scalar loss raises ``ValueError`` with ``gamma < 1``.
    labels: the drawn units (default: one per parameter tensor, as the code).
    executor: ``"gated"`` (default), or any executor of
      :func:`optax_sam.sharpness_aware`; ``beta=1`` has no draw (no
      executor choice matters).
    seed: PRNG seed of the draws.
    axis_name: mapped axis to average the gradients over.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`optax_sam.SharpnessAwareState` (``last_selection``: the tensors
    the last step drew).

  References:
    Du et al., `Efficient Sharpness-aware Minimization for Improved Training
    of Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022.
  """
  beta = args_lib.check_number(beta, "beta", 0.0, 1.0, low_open=True)
  gamma = args_lib.check_number(gamma, "gamma", 0.0, 1.0, low_open=True)
  perturb_lib.check_rho(rho)
  radius = ((lambda count: rho(count) / beta) if callable(rho)
            else rho / beta)
  if beta < 1.0:
    inner = engine.sharpness_aware(
        optimizer, perturb_lib.sam_perturbation(radius),
        policy=bernoulli(beta, seed), unselected="perturbed",
        executor=executor,
        labels=per_leaf_label if labels is None else labels,
        axis_name=axis_name)
  else:
    inner = engine.sharpness_aware(
        optimizer, perturb_lib.sam_perturbation(radius), axis_name=axis_name)
  if gamma >= 1.0:
    return inner

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    if not isinstance(grad_fn, step_lib.LossOracle):
      raise ValueError(_NEEDS_C2)
    return inner.update(updates, state, params,
                        grad_fn=_SelectingOracle(grad_fn, gamma,
                                                 batch_argnums,
                                                 per_example_from_mean),
                        **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
