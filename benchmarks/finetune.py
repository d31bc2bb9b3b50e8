"""Fine-tuning benchmarks: pre-train once, fine-tune a copy with each method.

Two tasks share this module's loop, cost figures and summaries:

* vision (this module's ``main``): a Flax MLP (or the SmallCNN) from
  ``optax_sam.models`` pre-trained with AdamW on Fashion-MNIST classes 0-4,
  then fine-tuned on classes 5-9 by each method with the same AdamW
  schedule, data order (by seed) and number of steps;
* language model (``benchmarks/lm.py``): a character Transformer pre-trained
  on the non-comedy plays, fine-tuned on the comedies.

Classifier head (vision). Both tasks are 5-way (labels ``y`` and ``y - 5``),
so the model has one 5-way head. For fine-tuning the head is
**re-initialised** (seeded by the fine-tuning seed: ``PRNGKey(1000 + seed)``)
and trained with the body; the pre-trained head is **kept aside**, so the
accuracy on classes 0-4 after fine-tuning is the fine-tuned body with the
old head (a task-incremental, multi-head reading of forgetting: how much the
shared features drifted), not a 10-way classifier's.

Recorded per run (``fit`` and ``cost_figures``):

* ``train_time_s``: wall time of the training steps except those that
  compiled a program: the first step (``first_step_s``) and, for a
  host-driven method (``layerwise_sam``'s new selections), each later step
  that compiled one (``compile_steps``, ``compile_steps_s``), each timed
  apart between two waits for the device; ``step_time_ms`` is
  ``train_time_s`` over the steps it covers;
* ``clean_active`` / ``perturbed_active``: mean over the steps of the
  fraction of parameters whose gradient the clean pass and the pass at
  ``w + eps`` computed, read from the ``optax_sam.SharpnessAwareState`` in
  the optimizer state after every step (kept on the device, summed once at
  the end); ``optax_sam.plain`` (the base optimizer alone) has one full
  pass: 1 and 0. ``active_ratio`` is their sum, the per-step
  active-parameter work relative to SGD's one full backward (SAM: 2).
  Methods without either state: ``None``;
* ``memory``: ``memory_analysis()`` of the compiled step (for a host-driven
  method, of each program it compiled, the one with the largest temporary
  buffer): ``temp_size_in_bytes``, ``argument_size_in_bytes``,
  ``output_size_in_bytes``; ``state_bytes``: the optimizer state's leaves'
  ``nbytes`` (base optimizer included).

``python -m benchmarks.finetune --name finetune_vision`` (the recorded
vision figures); ``python -m benchmarks.lm --name finetune_lm --methods ...``
(the LM's).
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from benchmarks import clock as clock_lib
from benchmarks import data as data_lib
from benchmarks import methods as methods_lib
from benchmarks import provenance
from benchmarks import run as run_lib
from benchmarks import train as train_lib

METHODS = "sgd,sam,slsam,slsam_vit,layerwise_sam"
MEMORY_FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes",
                 "output_size_in_bytes")


def adamw(lr: float, steps: int, weight_decay: float = 0.01):
  """The base optimizer of both tasks: AdamW, cosine decay to 0."""
  return optax.adamw(optax.cosine_decay_schedule(lr, steps),
                     weight_decay=weight_decay)


def build_method(name: str, base, seed: int,
                 hparams: Optional[dict[str, Any]] = None,
                 total_steps: Optional[int] = None) -> methods_lib.Method:
  """``methods.build``, passing ``seed=`` to factories that take one (the
  SL-SAM bandit's draws then differ by seed), unless given in ``hparams``,
  and ``total_steps`` (the run's length) to the late-phase schedules."""
  hp = dict(hparams or {})
  factory = getattr(optax_sam, {"slsam_vit": "slsam"}.get(name, name), None)
  if "seed" not in hp and callable(factory):
    try:
      if "seed" in inspect.signature(factory).parameters:
        hp["seed"] = seed
    except (TypeError, ValueError):
      pass
  try:
    return methods_lib.build(name, base, total_steps=total_steps, **hp)
  except AttributeError as e:  # e.g. slsam_vit before optax_sam.slsam
    raise ValueError(f"method {name!r} needs {e}") from e


def factory_defaults(name: str) -> Optional[dict[str, Any]]:
  """Keyword defaults of ``optax_sam.<name>`` (what an unregistered name
  runs with), or None for registered names."""
  if name in methods_lib.names() or not callable(getattr(optax_sam, name,
                                                         None)):
    return None
  return {k: p.default for k, p in inspect.signature(
      getattr(optax_sam, name)).parameters.items()
          if p.default is not inspect.Parameter.empty and isinstance(
              p.default, (int, float, str, bool, type(None)))}


def sharpness_state(opt_state) -> Optional[optax_sam.SharpnessAwareState]:
  """The ``SharpnessAwareState`` inside ``opt_state`` (None if none)."""
  for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax_sam.SharpnessAwareState)):
    if isinstance(leaf, optax_sam.SharpnessAwareState):
      return leaf
  return None


class Fit(NamedTuple):
  """A training run's result (see the module docstring)."""
  params: Any
  state: Any
  steps: int
  train_time_s: float
  first_step_s: float
  compile_steps: int  # later steps that compiled a program, timed apart
  compile_steps_s: float
  clean_active: Optional[float]
  perturbed_active: Optional[float]
  programs: list[Any]  # the jitted programs the run ran
  batch: tuple[Any, ...]  # one batch, for lowering the programs


def fit(method: methods_lib.Method, loss_fn, params,
        batches: Iterable[tuple[np.ndarray, ...]], *,
        every: int = 0,
        on_eval: Optional[Callable[[int, Any], None]] = None) -> Fit:
  """Trains ``params`` with ``method`` on ``batches`` (tuples of arrays, the
  loss function's arguments after ``params``).

  With ``every > 0``, ``on_eval(steps_done, params)`` is called after every
  ``every`` steps (an evaluation; its time is not training time)."""
  programs: list[Any] = []

  def jit(f):
    programs.append(jax.jit(f))
    return programs[-1]

  tx = method.tx
  state = tx.init(params)
  if method.specialized:
    driver = optax_sam.SpecializedStep(tx, loss_fn, jit=jit)
    apply = jax.jit(optax.apply_updates)

    def step(p, s, *b):
      _, u, s = driver(p, s, *b)
      return apply(p, u), s
  else:
    update = optax_sam.make_update(tx, loss_fn)

    def one(p, s, *b):
      _, u, s = update(p, s, *b)
      return optax.apply_updates(p, u), s

    step = jit(one)

  plain = isinstance(state, optax_sam.PlainState)
  tracked = sharpness_state(state) is not None
  active, batch = [], None
  clock = clock_lib.StepClock(lambda: len(programs))
  clock.start()
  for b in data_lib.prefetch(batches):
    b = tuple(jnp.asarray(a) for a in b)
    if batch is None:
      batch = b
    params, state = clock.step(step, params, state, *b)
    if tracked:
      sa = sharpness_state(state)
      active.append((sa.clean_active, sa.perturbed_active))
    if every > 0 and on_eval is not None and clock.steps % every == 0:
      clock.stop(params)
      on_eval(clock.steps, params)
      clock.start()
  clock.stop(params)
  if tracked:
    asc, desc = (float(jnp.mean(jnp.stack([a[i] for a in active])))
                 for i in (0, 1))
  else:
    asc, desc = (1.0, 0.0) if plain else (None, None)
  return Fit(params, state, clock.steps, clock.train_s, clock.first_step_s,
             clock.compile_steps, clock.compile_steps_s, asc, desc, programs,
             batch)


def compiled_memory(result: Fit) -> dict[str, Any]:
  """``memory_analysis()`` of the run's compiled programs (the one with the
  largest temporary buffer) and the number of programs."""
  best = None
  for program in result.programs:
    mem = program.lower(result.params, result.state,
                        *result.batch).compile().memory_analysis()
    row = {k: int(getattr(mem, k)) for k in MEMORY_FIELDS}
    if best is None or row["temp_size_in_bytes"] > best["temp_size_in_bytes"]:
      best = row
  return {**(best or {}), "programs": len(result.programs)}


def cost_figures(result: Fit) -> dict[str, Any]:
  """The per-run cost columns of both tasks (module docstring), and the
  host's 1-minute load average at the end of the run (other processes
  competing for the CPU show in it)."""
  timed = max(result.steps - 1 - result.compile_steps, 1)
  ratio = (None if result.clean_active is None
           else result.clean_active + result.perturbed_active)
  return {"load_avg_1m": os.getloadavg()[0],
          "steps": result.steps, "train_time_s": result.train_time_s,
          "step_time_ms": 1e3 * result.train_time_s / timed,
          "first_step_s": result.first_step_s,
          "compile_steps": result.compile_steps,
          "compile_steps_s": result.compile_steps_s,
          "clean_active": result.clean_active,
          "perturbed_active": result.perturbed_active, "active_ratio": ratio,
          "memory": compiled_memory(result),
          "state_bytes": run_lib._state_bytes(result.state)}  # pylint: disable=protected-access


def _get(run: dict[str, Any], key: str):
  for part in key.split("."):
    run = run.get(part) if isinstance(run, dict) else None
  return run


def _std(v: Sequence[float]) -> float:
  return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: Sequence[dict[str, Any]], metrics: Sequence[str], *,
              paired: Sequence[str] = (), ratios: Sequence[str] = (),
              base: str = "sgd") -> dict[str, dict[str, Any]]:
  """Per method (in order of first appearance): mean and std over seeds of
  each metric (``a.b`` reads nested keys; written ``a_b``), the mean and std
  of the paired difference to ``base`` on the same seed for ``paired``, and
  the mean ratio to ``base`` for ``ratios``. Missing values are skipped."""
  names = list(dict.fromkeys(r["method"] for r in runs))
  by_seed = {r["seed"]: r for r in runs if r["method"] == base}
  out = {}
  for name in names:
    rs = [r for r in runs if r["method"] == name]
    row: dict[str, Any] = {"seeds": len(rs)}
    for k in metrics:
      v = [_get(r, k) for r in rs if _get(r, k) is not None]
      if v:
        key = k.replace(".", "_")
        row[key], row[key + "_std"] = float(np.mean(v)), _std(v)
    for k in paired:
      d = [_get(r, k) - _get(by_seed[r["seed"]], k) for r in rs
           if r["seed"] in by_seed and _get(r, k) is not None]
      if d:
        row[k + "_minus_base"] = float(np.mean(d))
        row[k + "_minus_base_std"] = _std(d)
    for k in ratios:
      q = [_get(r, k) / _get(by_seed[r["seed"]], k) for r in rs
           if r["seed"] in by_seed and _get(r, k) is not None]
      if q:
        row[k.removesuffix("_s") + "_ratio"] = float(np.mean(q))
    out[name] = row
  return out


class Progress:
  """``[run k/N] label ... (elapsed)`` lines."""

  def __init__(self, total: int):
    self.total, self.done, self.t0 = total, 0, time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def start(self, label: str) -> None:
    self.done += 1
    print(f"[run {self.done}/{self.total}] {label} (elapsed "
          f"{self.elapsed():.0f}s)", flush=True)


def runs_plan(methods: str, seeds: str) -> list[tuple[int, str]]:
  return [(int(s), m) for s in seeds.split(",") for m in methods.split(",")]


def print_table(summary: dict[str, dict[str, Any]],
                columns: Sequence[tuple[str, str, str]]) -> None:
  """``columns``: (header, key, format); a key's ``_std`` is appended."""
  print("\n" + f"{'method':<15}" + "".join(f"{h:>22}" for h, _, _ in columns))
  for name, s in summary.items():
    cells = []
    for _, k, f in columns:
      v = s.get(k)
      cell = "-" if v is None else format(v, f)
      if v is not None and k + "_std" in s:
        cell += "±" + format(s[k + "_std"], f.lstrip("+"))
      cells.append(f"{cell:>22}")
    print(f"{name:<15}" + "".join(cells))


# ------------------------------------------------------------------ vision


def split_classes(x: np.ndarray, y: np.ndarray, classes: Sequence[int],
                  limit: Optional[int] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The examples of ``classes``, labels re-mapped to ``0..len-1``."""
  keep = np.isin(y, classes)
  x, y = x[keep], y[keep]
  remap = np.full(int(max(classes)) + 1, -1, np.int32)
  remap[list(classes)] = np.arange(len(classes), dtype=np.int32)
  if limit is not None:
    x, y = x[:limit], y[:limit]
  return x, remap[y]


def _vision_model(args, num_classes: int):
  from optax_sam.models import MLP, SmallCNN  # pylint: disable=g-import-not-at-top
  if args.model == "mlp":
    return MLP(hidden=tuple(int(h) for h in args.hidden.split(",")),
               num_classes=num_classes)
  return SmallCNN(num_classes=num_classes, width=args.width,
                  hidden=args.cnn_hidden)


def nll(loss_fn, params, x, y, batch: int = 1000) -> float:
  """Mean test cross-entropy (nats)."""
  f = jax.jit(loss_fn)
  return float(sum(float(f(params, x[i:i + batch], y[i:i + batch])) *
                   len(x[i:i + batch]) for i in range(0, len(x), batch))
               / len(x))


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      description="Fashion-MNIST fine-tuning: pre-train on classes 0-4, "
      "fine-tune on 5-9 with each method.")
  parser.add_argument("--methods", default=METHODS)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
  parser.add_argument("--hidden", default="256,256,256",
                      help="MLP hidden widths")
  parser.add_argument("--width", type=int, default=8, help="CNN width")
  parser.add_argument("--cnn-hidden", type=int, default=64)
  parser.add_argument("--pretrain-epochs", type=int, default=3)
  parser.add_argument("--finetune-epochs", type=int, default=5)
  parser.add_argument("--pretrain-examples", type=int, default=None,
                      help="first N training images of classes 0-4 (all)")
  parser.add_argument("--finetune-examples", type=int, default=10000,
                      help="first N training images of classes 5-9")
  parser.add_argument("--test-examples", type=int, default=None,
                      help="first N test images of each half (all)")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--finetune-lr", type=float, default=1e-3)
  parser.add_argument("--hparams", default="")
  parser.add_argument("--name", default="finetune_vision")
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args(argv)
  provenance.record_start()
  plan = runs_plan(args.methods, args.seeds)
  progress = Progress(len(plan) + 1)
  old_cls, new_cls = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
  (xtr, ytr), (xte, yte) = data_lib.load_fashion_mnist()
  old_train = split_classes(xtr, ytr, old_cls, args.pretrain_examples)
  new_train = split_classes(xtr, ytr, new_cls, args.finetune_examples)
  old_test = split_classes(xte, yte, old_cls, args.test_examples)
  new_test = split_classes(xte, yte, new_cls, args.test_examples)

  model = _vision_model(args, len(old_cls))
  loss_fn = train_lib.cross_entropy(model)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(xtr[:1]))["params"]
  head = sorted(params)[-1]  # layer names sort in depth order
  pre_steps = args.pretrain_epochs * (len(old_train[0]) // args.batch)
  fine_steps = args.finetune_epochs * (len(new_train[0]) // args.batch)

  progress.start(f"pre-train {pre_steps} steps on classes 0-4")
  pre = fit(methods_lib.build("sgd", adamw(args.lr, pre_steps)), loss_fn,
            params, data_lib.iterate_batches(old_train, args.batch, 0,
                                             args.pretrain_epochs))
  pre_params = pre.params
  old_acc_before = train_lib.accuracy(model, pre_params, *old_test)
  pretrain = {"steps": pre.steps, "train_time_s": pre.train_time_s,
              "head": head, "old_test_acc": old_acc_before,
              "old_test_nll": nll(loss_fn, pre_params, *old_test)}
  print(f"  pre-trained in {pre.train_time_s:.0f}s: test acc on classes 0-4 "
        f"{old_acc_before:.4f}", flush=True)

  hparams = methods_lib.parse_hparams(args.hparams)
  runs = []
  for seed, name in plan:
    progress.start(f"seed {seed} {name}")
    fresh = model.init(jax.random.PRNGKey(1000 + seed),
                       jnp.asarray(xtr[:1]))["params"]
    start = {**pre_params, head: fresh[head]}
    m = build_method(name, adamw(args.finetune_lr, fine_steps), seed,
                     hparams.get(name))
    r = fit(m, loss_fn, start, data_lib.iterate_batches(
        new_train, args.batch, seed + 1, args.finetune_epochs))
    old_head = {**r.params, head: pre_params[head]}
    after = train_lib.accuracy(model, old_head, *old_test)
    rec = {"method": name, "seed": seed, "hparams": m.hparams,
           "test_acc": train_lib.accuracy(model, r.params, *new_test),
           "test_nll": nll(loss_fn, r.params, *new_test),
           "old_acc_before": old_acc_before, "old_acc_after": after,
           "forgetting": old_acc_before - after, **cost_figures(r)}
    runs.append(rec)
    print(f"  acc {rec['test_acc']:.4f} nll {rec['test_nll']:.4f} old acc "
          f"{after:.4f} active {_fmt(rec['active_ratio'])} "
          f"{rec['step_time_ms']:.1f} ms/step", flush=True)

  summary = summarize(
      runs, ["test_acc", "test_nll", "old_acc_after", "forgetting",
             "train_time_s", "step_time_ms", "clean_active",
             "perturbed_active", "active_ratio", "state_bytes",
             "memory.temp_size_in_bytes", "memory.argument_size_in_bytes",
             "memory.output_size_in_bytes"],
      paired=["test_acc", "test_nll", "forgetting"],
      ratios=["train_time_s"])
  print_table(summary, [("test acc", "test_acc", ".4f"),
                        ("Δ acc", "test_acc_minus_base", "+.4f"),
                        ("test nll", "test_nll", ".4f"),
                        ("forgetting", "forgetting", ".4f"),
                        ("active", "active_ratio", ".3f"),
                        ("time/base", "train_time_ratio", ".2f")])
  print(f"\n{len(plan)} fine-tuning runs in {progress.elapsed():.0f}s")
  result = {"kind": "finetune_vision", "settings": vars(args),
            "task": {"old_classes": list(old_cls),
                     "new_classes": list(new_cls),
                     "pretrain_examples": len(old_train[0]),
                     "finetune_examples": len(new_train[0]),
                     "finetune_steps": fine_steps,
                     "test_examples": [len(old_test[0]), len(new_test[0])],
                     "param_count": int(sum(x.size for x in
                                            jax.tree.leaves(params)))},
            "method_defaults": {n: factory_defaults(n)
                                for n in args.methods.split(",")
                                if factory_defaults(n) is not None},
            "pretrain": pretrain, "summary": summary, "runs": runs,
            "wall_time_s": progress.elapsed()}
  if not args.no_write:
    path = provenance.write_result(
        args.name, result, seeds=[int(s) for s in args.seeds.split(",")],
        results_dir=args.results_dir)
    print(f"wrote {path}")
  return result


def _fmt(x, spec=".3f"):
  return "-" if x is None else format(x, spec)


if __name__ == "__main__":
  main()
