"""One training run of one method: accuracy, wall time, gradient norm,
sharpness.

Every method of a comparison gets the same data order (by seed), model
initialisation (by seed), base optimizer and learning-rate schedule; only the
transformation differs. Recorded per run:

* test accuracy and cumulative training wall time after every epoch (so
  accuracy at SGD's wall-clock budget can be read off);
* the first step's time apart (it includes compilation), the number and time
  of later steps that compiled a program (``compile_steps``,
  ``compile_steps_s``: a method of several static programs compiles each at
  its first use), and the number of programs compiled; neither counts as
  training time (:class:`benchmarks.clock.StepClock`);
* at the end: the whole-model gradient norm on a fixed training subset, and
  the top Hessian eigenvalue on it (power iteration on Hessian-vector
  products), the "mechanism" figures of BENCHMARKS.md;
* for layer-selective methods, the selection every few steps and how often
  each layer was selected.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from benchmarks import clock as clock_lib
from benchmarks import data as data_lib
from benchmarks import methods as methods_lib

try:
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
except ImportError:
  tqdm = None


class Task(NamedTuple):
  """A classification benchmark.

  Attributes:
    name: e.g. ``"fashion_mnist"``.
    load: ``seed -> ((x_train, y_train), (x_test, y_test))`` numpy arrays.
    model: ``() -> flax module`` mapping images to logits.
    epochs: training epochs.
    batch: batch size.
    lr: peak learning rate (cosine decay to 0), SGD momentum 0.9.
    weight_decay: decoupled into the base optimizer (same for all methods).
    labels: layer labels for layer-selective methods (None: default).
    augment: random 2-pixel crop after zero padding and horizontal flip of
      each training batch (``data.augment``), the same draws for every
      method (keyed by seed and step).
  """
  name: str
  load: Callable[[int], Any]
  model: Callable[[], Any]
  epochs: int
  batch: int
  lr: float
  weight_decay: float = 5e-4
  labels: Any = None
  augment: bool = False


def cross_entropy(model):
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn


def accuracy(model, params, x, y, batch: int = 1000) -> float:
  """Test accuracy (:func:`evaluate`'s ``"acc"``)."""
  return evaluate(model, params, x, y, batch)["acc"]


def evaluate(model, params, x, y, batch: int = 1000,
             bins: int = 15) -> dict[str, float]:
  """Test accuracy, negative log-likelihood and expected calibration error.

  ECE (Guo et al. 2017): the examples are binned by confidence (the largest
  softmax probability) into ``bins`` equal-width bins on [0, 1]; ECE is the
  example-weighted mean over bins of |accuracy - mean confidence|.
  """
  @jax.jit
  def parts(p, xb, yb):
    logp = jax.nn.log_softmax(model.apply({"params": p}, xb).astype(
        jnp.float32))
    nll = -jnp.take_along_axis(logp, yb[:, None].astype(jnp.int32), 1)[:, 0]
    conf = jnp.exp(jnp.max(logp, -1))
    return jnp.argmax(logp, -1) == yb, nll, conf

  correct, nll, conf = [], [], []
  for i in range(0, len(x), batch):
    c, n, f = parts(params, x[i:i + batch], y[i:i + batch])
    correct.append(np.asarray(c))
    nll.append(np.asarray(n))
    conf.append(np.asarray(f))
  correct, nll, conf = map(np.concatenate, (correct, nll, conf))
  return {"acc": float(correct.mean()), "nll": float(nll.mean()),
          "ece": expected_calibration_error(conf, correct, bins)}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               bins: int = 15) -> float:
  """ECE with ``bins`` equal-width confidence bins (a bin's upper edge is
  inclusive, the first bin includes 0)."""
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, np.float64)
  idx = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
  total = 0.0
  for b in range(bins):
    sel = idx == b
    if sel.any():
      total += sel.sum() * abs(correct[sel].mean() - confidence[sel].mean())
  return float(total / max(len(confidence), 1))


def tree_norm(tree) -> float:
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(v, jnp.float32)))
                            for v in jax.tree.leaves(tree))))


def top_hessian_eigenvalue(loss_fn, params, x, y, *, iters: int = 20,
                           seed: int = 0) -> float:
  """Largest-magnitude Hessian eigenvalue by power iteration on HVPs."""
  grad = jax.grad(lambda p: loss_fn(p, x, y))
  hvp = jax.jit(lambda p, v: jax.jvp(grad, (p,), (v,))[1])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                   for k, x in zip(keys, leaves)])
  lam = 0.0
  for _ in range(iters):
    n = tree_norm(v)
    v = jax.tree.map(lambda a: a / n, v)
    hv = hvp(params, v)
    lam = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v),
                                                   jax.tree.leaves(hv))))
    v = hv
  return lam


def train(task: Task, method: str, seed: int, *,
          hparams: Optional[dict[str, Any]] = None, progress: bool = True,
          data: Any = None, sharpness_examples: int = 1024,
          selection_every: int = 20,
          on_epoch: Optional[Callable[..., None]] = None) -> dict[str, Any]:
  """Trains ``method`` on ``task`` with ``seed``; returns the run record.

  Each epoch ends with the test accuracy, NLL and ECE (15 bins) in
  ``history``; the record has the last epoch's and the best epoch's test
  accuracy (``peak_test_acc``, what early stopping on a clean validation
  set would reach at best). ``on_epoch(epoch, epochs, steps_per_epoch,
  first_step_s)`` is called after each epoch (progress reporting).
  """
  (xtr, ytr), (xte, yte) = data if data is not None else task.load(seed)
  model = task.model()
  params = model.init(jax.random.PRNGKey(seed), jnp.asarray(xtr[:1]))[
      "params"]
  loss_fn = cross_entropy(model)
  steps_per_epoch = len(xtr) // task.batch
  total = task.epochs * steps_per_epoch
  schedule = optax.cosine_decay_schedule(task.lr, total)
  base = optax.chain(optax.add_decayed_weights(task.weight_decay),
                     optax.sgd(schedule, momentum=0.9))
  m = methods_lib.build(method, base, labels=task.labels, total_steps=total,
                        **(hparams or {}))
  state = m.tx.init(params)

  if m.specialized:
    driver = optax_sam.SpecializedStep(m.tx, loss_fn)
    apply = jax.jit(optax.apply_updates)

    def step(p, s, x, y):
      (loss, _), u, s = driver(p, s, x, y)
      return apply(p, u), s, loss

    compilations = lambda: driver.compilations
  else:
    update = optax_sam.make_update(m.tx, loss_fn)

    @jax.jit
    def step(p, s, x, y):
      (loss, _), u, s = update(p, s, x, y)
      return optax.apply_updates(p, u), s, loss

    compilations = step._cache_size  # pylint: disable=protected-access

  augment = jax.jit(data_lib.augment) if task.augment else None
  aug_key = jax.random.PRNGKey(10_000 + seed)

  def one(p, s, xb, yb, t):
    if augment is not None:
      xb = augment(jax.random.fold_in(aug_key, t), xb)
    return step(p, s, xb, yb)

  history, selections = [], []
  clock, t = clock_lib.StepClock(compilations), 0
  bar = (tqdm(total=total, desc=f"{task.name}/{method}/s{seed}", leave=False)
         if progress and tqdm is not None else None)
  for epoch in range(task.epochs):
    losses = []
    clock.start()
    order = data_lib.epoch_batches(len(xtr), task.batch, seed, epoch)
    for xb, yb in data_lib.prefetch((xtr[i], ytr[i]) for i in order):
      params, state, loss = clock.step(one, params, state, xb, yb, t)
      losses.append(loss)
      if hasattr(state, "last_selection") and t % selection_every == 0:
        selections.append([t, np.asarray(state.last_selection).astype(
            int).tolist()])
      t += 1
      if bar is not None:
        bar.update(1)
    train_time = clock.stop(params)
    ev = evaluate(model, params, xte, yte)
    history.append({"epoch": epoch + 1, "train_time_s": train_time,
                    "train_loss": float(jnp.mean(jnp.stack(losses))),
                    "test_acc": ev["acc"], "test_nll": ev["nll"],
                    "test_ece": ev["ece"]})
    if on_epoch is not None:
      on_epoch(epoch + 1, task.epochs, steps_per_epoch, clock.first_step_s)
  if bar is not None:
    bar.close()

  xs, ys = xtr[:sharpness_examples], ytr[:sharpness_examples]
  record = {
      "method": method, "seed": seed, "hparams": m.hparams,
      "test_acc": history[-1]["test_acc"], **clock.fields(),
      "test_nll": history[-1]["test_nll"],
      "test_ece": history[-1]["test_ece"],
      "peak_test_acc": max(h["test_acc"] for h in history),
      "history": history,
      "grad_norm": tree_norm(jax.jit(jax.grad(loss_fn))(params, xs, ys)),
      "train_loss_subset": float(jax.jit(loss_fn)(params, xs, ys)),
      "hessian_top_eig": top_hessian_eigenvalue(loss_fn, params, xs, ys,
                                                seed=seed),
  }
  if hasattr(state, "recomputes"):
    record["recompute_fraction"] = float(state.recomputes) / max(
        int(state.count), 1)
  if selections:
    groups = optax_sam.layer_groups(params, labels=task.labels)
    counts = np.sum([s for _, s in selections], axis=0)
    record["selection"] = {"groups": list(groups.names),
                           "every": selection_every, "trace": selections,
                           "fraction_selected": (counts / len(selections)
                                                 ).tolist()}
  return record


def accuracy_at_budget(record: dict[str, Any], budget_s: float
                       ) -> Optional[float]:
  """Test accuracy after the last epoch finished within ``budget_s``."""
  within = [h for h in record["history"] if h["train_time_s"] <= budget_s]
  return within[-1]["test_acc"] if within else None
