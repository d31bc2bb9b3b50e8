"""Flax NNX adapters for ``optax_sam``'s two call paths; needs ``flax``.

Not imported by ``optax_sam`` itself: ``import optax_sam.nnx`` explicitly.

``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands ``tx.update`` *pure*
trees (``nnx.as_pure(nnx.state(model, wrt))``: an ``nnx.State`` of arrays,
no ``Param`` wrappers), and the core of ``optax_sam`` works on such trees
only. The two helpers here do the splitting and merging, so that each path
is one call:

* C1, drop-in: ``nnx.Optimizer.update`` passes extra keyword arguments on to
  ``tx.update``, so the SAM methods get their ``grad_fn`` through it::

    optimizer = nnx.Optimizer(model, optax_sam.sam(optax.sgd(0.1)),
                              wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      optimizer.update(model, grads,
                       grad_fn=optax_sam.nnx.grad_fn(model, loss_fn, x, y))
      return loss

* C2, loss-driven (the library runs every gradient pass, and a pass
  restricted to some layers compiles to less work)::

    train_step = nnx.jit(optax_sam.nnx.make_update(loss_fn))
    loss = train_step(model, optimizer, x, y)  # updates both in place

``loss_fn(model, *args)`` takes the module first, as ``nnx.grad`` expects.
State that is not in ``wrt`` (BatchNorm statistics, RNG counters) is read
from the model; in C2 the changes the clean (unperturbed) pass makes to it
are written back to the model, as a plain ``nnx.grad`` step would. In C1 the
caller's own ``nnx.grad`` call does that, and the passes ``grad_fn`` runs
change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import optax

from optax_sam._src import conv as conv_lib
from optax_sam._src import step as step_lib

__all__ = ("grad_fn", "make_update")


def _pure_loss(graphdef: Any, wrt: Any, loss_fn: Callable[..., Any],
               has_aux: bool) -> Callable[..., Any]:
  """``(params, rest, *args) -> (loss, (aux, new_rest))`` on pure states."""

  def pure_loss(params, rest, *args):
    model = nnx.merge(graphdef, params, rest)
    out = loss_fn(model, *args)
    loss, aux = out if has_aux else (out, None)
    _, _, new_rest = nnx.split(model, wrt, ...)
    return loss, (aux, nnx.as_pure(new_rest))

  return pure_loss


def _split(model: nnx.Module, wrt: Any) -> tuple[Any, Any, Any]:
  """``(graphdef, params, rest)``, the two states pure (arrays only)."""
  graphdef, params, rest = nnx.split(model, wrt, ...)
  return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


def grad_fn(model: nnx.Module, loss_fn: Callable[..., Any], *args: Any,
            wrt: Any = nnx.Param,
            has_aux: bool = False) -> Callable[[Any, int], Any]:
  """The ``grad_fn`` of call path C1 for an NNX model.

  ``optimizer.update(model, grads, grad_fn=optax_sam.nnx.grad_fn(model,
  loss_fn, x, y))``: the SAM method calls it at the perturbed parameters.

  Args:
    model: the ``nnx.Module`` being trained (its non-``wrt`` state, e.g.
      BatchNorm statistics, is read once, now).
    loss_fn: ``loss_fn(model, *args) -> loss`` (``-> (loss, aux)`` with
      ``has_aux``), the function the clean gradient came from.
    *args: the batch (the same as for the clean gradient).
    wrt: the filter of the trained variables; must be the optimizer's
      ``wrt`` (default ``nnx.Param``).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``grad_fn(params, i) -> grads``: ``params`` the pure state
    ``nnx.Optimizer`` hands to ``tx.update``, ``grads`` shaped like it.
  """
  graphdef, _, rest = _split(model, wrt)
  pure_loss = _pure_loss(graphdef, wrt, loss_fn, has_aux)

  def fn(params: Any, index: int = 0) -> Any:
    del index
    return jax.grad(lambda p: pure_loss(p, rest, *args)[0])(params)

  return fn


def make_update(
    loss_fn: Callable[..., Any],
    has_aux: bool = False,
    *,
    conv_backward: conv_lib.ConvBackward = "auto",
) -> Callable[..., Any]:
  """A loss-driven training step (call path C2) for an ``nnx.Optimizer``.

  :func:`optax_sam.make_update` around ``nnx.split``/``nnx.merge``: the
  library runs every gradient pass of ``optimizer.tx`` (an ``optax_sam``
  method, or :func:`optax_sam.plain` for the baseline) itself. Wrap the step
  in ``nnx.jit``::

    optimizer = nnx.Optimizer(model, optax_sam.layerwise_sam(
        optax.sgd(0.1, momentum=0.9), rho=0.05), wrt=nnx.Param)
    train_step = nnx.jit(optax_sam.nnx.make_update(loss_fn))
    loss = train_step(model, optimizer, x, y)

  Args:
    loss_fn: ``loss_fn(model, *args) -> loss``, or ``-> (loss, aux)`` when
      ``has_aux``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    conv_backward: as for :func:`optax_sam.make_update`.

  Returns:
    ``step(model, optimizer, *args, **extra_args) -> loss`` (``(loss, aux)``
    with ``has_aux``), the values of the clean pass. It updates ``model``'s
    ``wrt`` variables and ``optimizer``'s state and step in place, and
    writes back the changes the clean pass made to the model's other state.
    ``extra_args`` go to ``tx.update``.
  """
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable, got {loss_fn!r}.")
  conv_lib.resolve_conv_backward(conv_backward)  # validates early

  def step(model: nnx.Module, optimizer: nnx.Optimizer, *args: Any,
           **extra_args: Any) -> Any:
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(
          "step(model, optimizer, *args) takes an nnx.Optimizer second; got "
          f"{type(optimizer).__name__}.")
    graph = getattr(optimizer, "graph", None)
    graphdef, params, rest = _split(model, optimizer.wrt)
    update = step_lib.make_update(
        optimizer.tx, _pure_loss(graphdef, optimizer.wrt, loss_fn, has_aux),
        has_aux=True,
        conv_backward=conv_backward)
    (loss, (aux, new_rest)), updates, opt_state = update(
        params, nnx.as_pure(optimizer.opt_state), rest, *args,
        **nnx.as_pure(extra_args))
    nnx.update(model, optax.apply_updates(params, updates), new_rest)
    nnx.update(optimizer.opt_state, nnx.state(opt_state, graph=graph))
    optimizer.step[...] += 1
    return (loss, aux) if has_aux else loss

  return step
