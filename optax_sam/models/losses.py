"""Losses, metrics and loss functions shaped for ``optax_sam.make_update``.

``optax_sam``'s loss-driven call path differentiates
``loss_fn(params, *args)`` (returning ``loss``, or ``(loss, aux)`` with
``has_aux=True``) with respect to ``params`` only. The builders here turn a
Flax model into such a function:

=================================  ==========================================
builder                            ``loss_fn`` it returns
=================================  ==========================================
:func:`classifier_loss`            ``(params, x, y) -> loss``, or
                                   ``-> (loss, logits)`` with
                                   ``return_logits=True``
:func:`batchnorm_classifier_loss`  ``(params, batch_stats, x, y) ->
                                   (loss, (new_batch_stats, logits))``,
                                   always ``has_aux=True``
:func:`lm_loss`                    ``(params, tokens) -> loss``, next-token
                                   loss on windows ``(B, T + 1)``
=================================  ==========================================

With ``dropout=True`` each takes one more trailing argument, the dropout
``rng``; the same key serves every gradient pass of one step, so the clean and
the perturbed passes see the same dropout mask. :func:`make_loss_fn` picks
the classifier builder from the model's variables and returns
``(loss_fn, has_aux)``::

  variables = model.init(key, x[:1])
  loss_fn, has_aux = make_loss_fn(model, variables)
  step = jax.jit(optax_sam.make_update(tx, loss_fn, has_aux=has_aux))
  # BatchNorm: args are (batch_stats, x, y); aux is (new_batch_stats, logits)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
LossFn = Callable[..., Any]


def cross_entropy(logits: Array, labels: Array,
                  label_smoothing: float = 0.0,
                  where: Optional[Array] = None) -> Array:
  """Mean softmax cross-entropy with integer labels.

  Args:
    logits: ``(..., num_classes)``.
    labels: integer labels shaped like ``logits.shape[:-1]``.
    label_smoothing: mass spread uniformly over all classes (0 for none).
    where: optional bool/0-1 mask shaped like ``labels``; the mean is over
      the selected positions only.

  Returns:
    A float32 scalar.
  """
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels {labels.shape} do not match logits "
                     f"{logits.shape}.")
  logits = logits.astype(jnp.float32)
  if label_smoothing:
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1); got "
                       f"{label_smoothing}.")
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    per = optax.softmax_cross_entropy(logits, targets)
  else:
    per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if where is None:
    return jnp.mean(per)
  w = jnp.asarray(where, jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def accuracy(logits: Array, labels: Array) -> Array:
  """Fraction of positions whose arg-max logit is the label (float32)."""
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def next_token_loss(logits: Array, tokens: Array) -> Array:
  """Next-token cross-entropy of an LM run on ``tokens[:, :-1]``.

  Args:
    logits: ``(B, T, vocab)`` computed from the inputs ``tokens[:, :-1]``.
    tokens: ``(B, T + 1)`` integer windows (inputs and shifted targets).

  Returns:
    The mean cross-entropy of predicting ``tokens[:, 1:]``, in nats per
    token (``exp`` of it is the perplexity).
  """
  return cross_entropy(logits, tokens[:, 1:])


def _rngs(dropout: bool, args: tuple[Any, ...], expected: int):
  if len(args) != expected + int(dropout):
    what = " and a dropout rng" if dropout else ""
    raise TypeError(f"loss_fn takes params plus {expected} arguments{what}; "
                    f"got {len(args)}.")
  return ({"dropout": args[-1]} if dropout else None), args[:expected]


def classifier_loss(model: nn.Module, *, train: bool = True,
                    label_smoothing: float = 0.0,
                    return_logits: bool = False,
                    dropout: bool = False) -> LossFn:
  """``loss_fn(params, x, y[, rng])`` for a model without BatchNorm.

  Args:
    model: a Flax module mapping ``x`` to logits, called as
      ``model.apply({"params": params}, x, train=train)``.
    train: passed to the model (enables dropout).
    label_smoothing: see :func:`cross_entropy`.
    return_logits: return ``(loss, logits)`` (use ``has_aux=True``).
    dropout: take a trailing dropout ``rng`` argument.

  Returns:
    The loss function.
  """

  def loss_fn(params, *args):
    rngs, (x, y) = _rngs(dropout, args, 2)
    logits = model.apply({"params": params}, x, train=train, rngs=rngs)
    loss = cross_entropy(logits, y, label_smoothing)
    return (loss, logits) if return_logits else loss

  return loss_fn


def batchnorm_classifier_loss(model: nn.Module, *,
                              label_smoothing: float = 0.0,
                              dropout: bool = False) -> LossFn:
  """``loss_fn(params, batch_stats, x, y[, rng])`` for a BatchNorm model.

  Runs the model in training mode (batch statistics from the batch, running
  averages updated) and returns ``(loss, (new_batch_stats, logits))``; use
  ``make_update(tx, loss_fn, has_aux=True)``. The aux of a step comes from
  the unperturbed pass, so the running statistics are those of the clean
  forward pass.
  """

  def loss_fn(params, batch_stats, *args):
    rngs, (x, y) = _rngs(dropout, args, 2)
    logits, new = model.apply({"params": params, "batch_stats": batch_stats},
                              x, train=True, mutable=["batch_stats"],
                              rngs=rngs)
    loss = cross_entropy(logits, y, label_smoothing)
    return loss, (new["batch_stats"], logits)

  return loss_fn


def lm_loss(model: nn.Module, *, train: bool = True,
            return_logits: bool = False, dropout: bool = False) -> LossFn:
  """``loss_fn(params, tokens[, rng])``: next-token loss of a language model.

  ``tokens`` are windows ``(B, T + 1)`` (as ``benchmarks.data.token_windows``
  yields); the model sees ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``.
  With ``return_logits`` the result is ``(loss, logits)``.
  """

  def loss_fn(params, *args):
    rngs, (tokens,) = _rngs(dropout, args, 1)
    logits = model.apply({"params": params}, tokens[:, :-1], train=train,
                         rngs=rngs)
    loss = next_token_loss(logits, tokens)
    return (loss, logits) if return_logits else loss

  return loss_fn


def make_loss_fn(model: nn.Module, variables: Mapping[str, Any],
                 **kwargs: Any) -> tuple[LossFn, bool]:
  """The classifier loss fitting ``variables``, and its ``has_aux``.

  A ``"batch_stats"`` collection selects :func:`batchnorm_classifier_loss`
  (``has_aux=True``); otherwise :func:`classifier_loss`. ``kwargs`` go to the
  builder.
  """
  if "batch_stats" in variables:
    return batchnorm_classifier_loss(model, **kwargs), True
  fn = classifier_loss(model, **kwargs)
  return fn, bool(kwargs.get("return_logits", False))


def eval_metrics(model: nn.Module) -> Callable[..., dict[str, Array]]:
  """``metrics(variables, x, y) -> {"loss", "accuracy"}`` in eval mode.

  ``variables`` is the full collection dict (``{"params": ...}`` plus
  ``"batch_stats"`` for BatchNorm models, which then use running averages).
  """

  def metrics(variables, x, y):
    logits = model.apply(variables, x, train=False)
    return {"loss": cross_entropy(logits, y),
            "accuracy": accuracy(logits, y)}

  return metrics
