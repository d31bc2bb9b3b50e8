"""Methods by name, for the benchmark harness.

A method is built from the base optimizer (the same for every method in a
run) and keyword hyper-parameters. Names registered here carry the defaults
used in the recorded figures; any other name is looked up in ``optax_sam``
(``optax_sam.<name>(base, **hparams)``), so a new method plugs in without
editing the harness.

Methods driven from the host loop (``specialized``) run under
``optax_sam.SpecializedStep``; a method with a layer policy returns it too,
so the cost harness knows its programs are per selection.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import optax

import optax_sam


class Method(NamedTuple):
  """A built method.

  ``specialized``: drive with ``optax_sam.SpecializedStep`` (one program per
  static decision: a layer selection, or recompute/reuse); ``policy``: the
  layer policy, when the method has one.
  """
  tx: optax.GradientTransformationExtraArgs
  policy: Optional[optax_sam.policies.Policy] = None
  hparams: dict[str, Any] = {}
  specialized: bool = False


_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str):
  """Decorator: ``@register("name") def build(base, **hparams) -> Method``."""
  def wrap(fn):
    _REGISTRY[name] = fn
    return fn
  return wrap


@register("sgd")
def _sgd(base, **hp):
  return Method(optax_sam.plain(base), None, hp)


@register("sam")
def _sam(base, rho=0.05, **hp):
  return Method(optax_sam.sam(base, rho=rho, **hp), None, dict(rho=rho, **hp))


@register("asam")
def _asam(base, rho=0.5, eta=0.01, **hp):
  return Method(optax_sam.asam(base, rho=rho, eta=eta, **hp), None,
                dict(rho=rho, eta=eta, **hp))


@register("layerwise_sam")
def _layerwise(base, rho=0.05, num_layers=2, every=100,
               executor="specialize", labels=None, budget=None, **hp):
  # The recorded figures drive the 'specialize' executor from the host loop
  # (exact cost per held selection). Since make_update's conv_backward="auto"
  # the default executor runs conv nets as fast on the CPU (README); pass
  # executor="auto" to measure it.
  if budget is not None:
    hp["budget"] = budget
  tx = optax_sam.layerwise_sam(base, rho=rho, num_layers=num_layers,
                               every=every, executor=executor,
                               labels=labels, **hp)
  policy = optax_sam.policies.layerwise_policy(
      num_layers, every, **{k: hp[k] for k in ("statistic", "ema", "initial",
                                               "budget", "costs")
                            if k in hp})
  return Method(tx, policy, dict(rho=rho, num_layers=num_layers,
                                 every=every, executor=executor, **hp),
                specialized=executor == "specialize")


@register("layerwise_sam_perturbed")
def _layerwise_perturbed(base, **hp):
  """layerwise_sam with the other layers descending along the gradient at
  the perturbed point (the library's 0.1 behaviour)."""
  return _layerwise(base, unselected="perturbed", **hp)


# ARSAM and LookSAM branch with lax.cond; the recorded figures run each
# branch as its own program (driver="host", exact cost per branch);
# driver="cond" measures the lax.cond program (as fast on the CPU since
# make_update's conv_backward="auto").
@register("arsam")
def _arsam(base, rho=0.05, driver="host", **hp):
  return Method(optax_sam.arsam(base, rho=rho, **hp), None,
                dict(rho=rho, driver=driver, **hp),
                specialized=driver == "host")


@register("looksam")
def _looksam(base, rho=0.05, every=5, alpha=0.1, driver="host", **hp):
  return Method(optax_sam.looksam(base, rho=rho, every=every, alpha=alpha,
                                  **hp), None,
                dict(rho=rho, every=every, alpha=alpha, driver=driver, **hp),
                specialized=driver == "host")


# SL-SAM (Cheng et al. 2026) in the authors' README / ViT setting: a fifth
# of the tensors per step, rho 0.01. Plain "slsam" falls through to
# optax_sam.slsam and its defaults.
@register("slsam_vit")
def _slsam_vit(base, rho=0.01, fraction=0.2, **hp):
  return Method(optax_sam.slsam(base, rho=rho, fraction=fraction, **hp), None,
                dict(rho=rho, fraction=fraction, **hp))


# Issue 13's schedules: SAM every k steps (SGD in between), SAM only in the
# last fraction of training (Zhou et al. 2025), and their compositions with
# layer-wise selection and with ARSAM's reuse. ``total_steps`` is the run's
# length, given by the harness (train.py) to builders that take it.
S = optax_sam.schedules


@register("periodic_sam")
def _periodic(base, rho=0.05, every=5, driver="host", **hp):
  tx = optax_sam.sam(base, rho=rho, schedule=S.recompute_every(every),
                     mixer=S.plain_mixer(), **hp)
  return Method(tx, None, dict(rho=rho, every=every, driver=driver, **hp),
                specialized=driver == "host")


@register("late_sam")
def _late(base, total_steps=1000, rho=0.05, fraction=0.25, every=1,
          driver="host", **hp):
  then = S.recompute_every(every) if every > 1 else None
  tx = optax_sam.sam(base, rho=rho, schedule=S.late_phase(
      total_steps, fraction, then=then), mixer=S.plain_mixer(), **hp)
  return Method(tx, None, dict(rho=rho, fraction=fraction, every=every,
                               driver=driver, **hp),
                specialized=driver == "host")


@register("late_layerwise")
def _late_layerwise(base, total_steps=1000, rho=0.05, fraction=0.25,
                    num_layers=2, every=100, labels=None, budget=None, **hp):
  """Layer-wise SAM in the late phase only (SGD before)."""
  tx = optax_sam.layerwise_sam(
      base, rho=rho, num_layers=num_layers, every=every, labels=labels,
      budget=budget, schedule=S.late_phase(total_steps, fraction),
      mixer=S.plain_mixer(), executor="specialize", **hp)
  policy = optax_sam.policies.layerwise_policy(num_layers, every,
                                               budget=budget)
  return Method(tx, policy, dict(rho=rho, fraction=fraction,
                                 num_layers=num_layers, every=every,
                                 budget=budget, **hp), specialized=True)


@register("late_arsam")
def _late_arsam(base, total_steps=1000, rho=0.05, fraction=0.5,
                target_fraction=0.2, every=None, driver="host", **hp):
  """ARSAM in the late phase only (SGD before): its adaptive rule with a
  target recompute fraction, or, with ``every``, a recompute every ``every``
  steps and ARSAM's reuse between them. (The engine recomputes on the first
  step of any method that stores a component, so the run's first step is a
  SAM step and the next ``horizon`` steps mix its PSF in.)"""
  then = (S.recompute_every(every) if every is not None else
          S.recompute_adaptive(target_fraction=target_fraction))
  tx = optax_sam.arsam(base, rho=rho,
                       schedule=S.late_phase(total_steps, fraction, then=then),
                       **hp)
  settings = (dict(every=every) if every is not None else
              dict(target_fraction=target_fraction))
  return Method(tx, None, dict(rho=rho, fraction=fraction, **settings,
                               driver=driver, **hp),
                specialized=driver == "host")


@register("arsam_every")
def _arsam_every(base, rho=0.05, every=5, driver="host", **hp):
  """ARSAM's reuse (PSF mixer) on a fixed interval."""
  tx = optax_sam.arsam(base, rho=rho, schedule=S.recompute_every(every), **hp)
  return Method(tx, None, dict(rho=rho, every=every, driver=driver, **hp),
                specialized=driver == "host")


@register("arsam_bernoulli")
def _arsam_bernoulli(base, rho=0.05, p=0.2, driver="host", **hp):
  """ARSAM's reuse (PSF mixer) on Bernoulli(p) steps."""
  tx = optax_sam.arsam(base, rho=rho,
                       schedule=S.recompute_with_probability(p), **hp)
  return Method(tx, None, dict(rho=rho, p=p, driver=driver, **hp),
                specialized=driver == "host")


# The SAM family (issue 17), each with its paper's / code's defaults.
@register("gsam")
def _gsam(base, rho_max=0.05, rho_min=0.05, alpha=0.3, **hp):
  # A constant radius by default (the harness's learning rate is constant);
  # rho_max=0.6, rho_min=0.1, alpha=0.6 are the ViT/ImageNet config's.
  return Method(optax_sam.gsam(base, rho_max, rho_min, alpha, **hp), None,
                dict(rho_max=rho_max, rho_min=rho_min, alpha=alpha, **hp))


@register("msam")
def _msam(base, rho=0.3, mu=0.9, **hp):
  return Method(optax_sam.msam(base, rho=rho, mu=mu, **hp), None,
                dict(rho=rho, mu=mu, **hp))


@register("sam_on")
def _sam_on(base, rho=0.05, **hp):
  # Needs a model with normalization layers (BatchNorm/LayerNorm): the MLP
  # and SmallCNN have none, and raise a clear error.
  return Method(optax_sam.sam_on(base, rho=rho, **hp), None,
                dict(rho=rho, **hp))


@register("esam")
def _esam(base, rho=0.05, beta=0.5, gamma=0.5, **hp):
  # The harness's loss is a mean: ESAM takes per-example losses from it by
  # vmap (its models have no BatchNorm in the training losses used here).
  hp.setdefault("per_example_from_mean", True)
  return Method(optax_sam.esam(base, rho=rho, beta=beta, gamma=gamma, **hp),
                None, dict(rho=rho, beta=beta, gamma=gamma, **hp))


@register("fsam")
def _fsam(base, rho=0.05, sigma=1.0, lmbda=0.9, **hp):
  return Method(optax_sam.fsam(base, rho=rho, sigma=sigma, lmbda=lmbda,
                               **hp), None,
                dict(rho=rho, sigma=sigma, lmbda=lmbda, **hp))


@register("sam_m")
def _sam_m(base, rho=0.05, m=1, micro_batch_loop="map", **hp):
  """SAM with the ascent per micro-batch of m examples (m=1: per example,
  Baek et al. 2024); ``sam_m@m=16`` for another m. The micro-batches run
  one after the other (``"map"``: 10-17x faster than ``"vmap"`` on the CPU
  for the 8x256 MLP, family_cost.json)."""
  return Method(optax_sam.sam(base, rho=rho, m=m,
                              micro_batch_loop=micro_batch_loop, **hp), None,
                dict(rho=rho, m=m, micro_batch_loop=micro_batch_loop, **hp))


_REGISTRY["lagnp"] = _REGISTRY["layerwise_sam"]


def names() -> list[str]:
  return sorted(_REGISTRY)


def build(name: str, base: optax.GradientTransformation,
          labels: Any = None, total_steps: Optional[int] = None,
          **hparams) -> Method:
  """The method ``name`` around ``base`` (see the module docstring).

  ``total_steps`` (the run's length) goes to the builders that take it
  (the late-phase schedules). A name may carry hyper-parameters after
  ``@`` (``"arsam@target_fraction=0.2"``, several joined by ``+``), so one
  run can compare settings of one method side by side.
  """
  if "@" in name:
    base_name, _, spec = name.partition("@")
    extra = parse_hparams(",".join(f"{base_name}:{kv}"
                                   for kv in spec.split("+")))
    return build(base_name, base, labels=labels, total_steps=total_steps,
                 **{**extra.get(base_name, {}), **hparams})
  if name in _REGISTRY:
    fn = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    if name in ("layerwise_sam", "lagnp", "layerwise_sam_perturbed",
                "late_layerwise"):
      hparams.setdefault("labels", labels)
    if "total_steps" in params and total_steps is not None:
      hparams.setdefault("total_steps", total_steps)
    return fn(base, **hparams)
  factory = getattr(optax_sam, name, None)
  if factory is None or not callable(factory):
    raise ValueError(f"unknown method {name!r}: registered {names()}, or a "
                     "factory of optax_sam.")
  return Method(factory(base, **hparams), None, dict(hparams))


def parse_hparams(spec: str) -> dict[str, dict[str, Any]]:
  """``"sam:rho=0.1,asam:rho=1.0"`` -> ``{"sam": {"rho": 0.1}, ...}``."""
  out: dict[str, dict[str, Any]] = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    method, _, kv = item.partition(":")
    key, _, value = kv.partition("=")
    if not key or not value:
      raise ValueError(f"bad hyper-parameter {item!r}; use method:key=value.")
    try:
      parsed: Any = int(value)
    except ValueError:
      try:
        parsed = float(value)
      except ValueError:
        parsed = value
    out.setdefault(method, {})[key] = parsed
  return out
