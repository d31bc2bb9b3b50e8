"""The benchmark entry point: what each method costs and what it buys.

``python -m benchmarks.run --preset quick --methods sgd,sam,asam,...``

For each task of the preset it measures, next to SGD and with the same base
optimizer (SGD, momentum 0.9, cosine schedule, weight decay) and data order:

* cost: compiled FLOPs of one training step and its ratio to SGD, temporary
  memory, optimizer-state bytes, and wall time per step with all methods
  interleaved in one process (``benchmarks/cost.py``);
* benefit: test accuracy after the same epochs (mean and std over seeds, and
  the paired difference to SGD), training wall time, accuracy within SGD's
  wall-clock budget, and the final whole-model gradient norm and top Hessian
  eigenvalue (``benchmarks/train.py``).

Presets: ``tiny`` (seconds; CI runs it to prove the harness, its numbers
mean nothing), ``quick`` (< 10 minutes on 2 CPU cores; README's main
command), ``full`` (the quoted figures). Results go to a new run folder
``benchmarks/runs/<UTC time>-<name>/`` (git-ignored) with their provenance,
a REPORT.md and plots; ``--record`` writes the committed
``benchmarks/results/<name>.json`` instead and regenerates
``benchmarks/results/REPORT.md`` from every recorded file (as ``python -m
benchmarks.report`` does). Progress: a line per training run (``run k of
N``, elapsed time, ETA from the post-compile step times measured so far) and
a per-run bar (``--no-bar``; ``--no-progress`` silences both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from benchmarks import cost as cost_lib
from benchmarks import methods as methods_lib
from benchmarks import progress as progress_lib
from benchmarks import provenance
from benchmarks import report as report_lib
from benchmarks import train as train_lib


# ------------------------------------------------------------------ tasks


def digits_task(epochs: int, noise: float = 0.2,
                layer_norm: bool = False) -> train_lib.Task:
  """scikit-learn digits (8x8), symmetric label noise on training labels;
  ``layer_norm``: the MLP with a LayerNorm after each hidden layer."""
  from benchmarks import data  # pylint: disable=g-import-not-at-top
  from optax_sam.models.vision import MLP  # pylint: disable=g-import-not-at-top

  def load(seed):
    return data.load_digits(label_noise=noise, seed=seed)

  return train_lib.Task(f"digits_noise{noise:g}" + ("_ln" if layer_norm
                                                    else ""), load,
                        lambda: MLP(hidden=(128, 128), layer_norm=layer_norm),
                        epochs, 64, 0.05)


def fashion_task(epochs: int, train_examples: Optional[int] = None,
                 width: int = 16, batch: int = 128,
                 label_noise: float = 0.0,
                 test_examples: Optional[int] = None) -> train_lib.Task:
  """Fashion-MNIST with the small CNN (Debian dataset-fashion-mnist);
  ``label_noise`` as in :func:`fashion_mlp_task`; ``test_examples`` keeps
  the first N test images (every epoch is evaluated: on 10,000 images that
  costs the width-16 CNN more than an epoch on 2,000)."""
  from benchmarks import data  # pylint: disable=g-import-not-at-top
  from optax_sam.models.vision import SmallCNN  # pylint: disable=g-import-not-at-top

  cache = {}

  def load(seed):
    # The split is fixed; the seed orders batches and inits (and the noise).
    if "d" not in cache:
      cache["d"] = data.load_fashion_mnist(train_examples=train_examples,
                                           test_examples=test_examples)
    if not label_noise:
      return cache["d"]
    (xtr, ytr), test = cache["d"]
    ytr = data.symmetric_noise(ytr, label_noise, 10,
                               np.random.default_rng(seed))
    return (xtr, ytr), test

  name = ("fashion_mnist" + (f"_{train_examples}" if train_examples else "")
          + (f"_w{width}" if width != 16 else "")
          + (f"_noise{label_noise:g}" if label_noise else "")
          + (f"_test{test_examples}" if test_examples else ""))
  return train_lib.Task(name, load,
                        lambda: SmallCNN(width=width, hidden=8 * width),
                        epochs, batch, 0.05)


def fashion_mlp_task(epochs: int, hidden: tuple[int, ...] = (512, 256),
                     batch: int = 128, label_noise: float = 0.0,
                     augment: bool = False) -> train_lib.Task:
  """Fashion-MNIST (all 60k) with an MLP: cheap enough on a CPU to train to
  convergence (the CNN's convolutions cost ~0.3 s a step on 2 cores).

  ``label_noise`` > 0 replaces that fraction of the *training* labels by a
  different class drawn uniformly (seeded by the run's seed; test labels
  stay clean).
  """
  from benchmarks import data  # pylint: disable=g-import-not-at-top
  from optax_sam.models.vision import MLP  # pylint: disable=g-import-not-at-top

  cache = {}

  def load(seed):
    # The split is fixed; the seed orders batches and inits (and the noise).
    if "d" not in cache:
      cache["d"] = data.load_fashion_mnist()
    (xtr, ytr), test = cache["d"]
    if label_noise:
      rng = np.random.default_rng(seed)
      ytr = data.symmetric_noise(ytr, label_noise, 10, rng)
    return (xtr, ytr), test

  name = ("fashion_mnist_mlp" + (f"_noise{label_noise:g}" if label_noise
                                 else "") + ("_aug" if augment else ""))
  return train_lib.Task(name, load, lambda: MLP(hidden=hidden), epochs,
                        batch, 0.05, augment=augment)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"tasks": lambda: [digits_task(2)], "seeds": [0],
             "methods": "sgd,sam", "cost_rounds": 2},
    # README's main command, < 10 min on 2 CPU cores: the CNN costs ~0.3 s
    # a step there, so Fashion-MNIST gets the MLP (all 60k, 2 epochs).
    "quick": {"tasks": lambda: [digits_task(40), fashion_mlp_task(2)],
              "seeds": [0, 1, 2],
              "methods": "sgd,sam,asam,layerwise_sam,arsam,looksam",
              "cost_rounds": 5},
    # The quoted figures. 3 epochs of the full 60k training set keeps a
    # 3-seed, 6-method run near an hour on a 2-core CPU.
    "full": {"tasks": lambda: [fashion_task(3)], "seeds": [0, 1, 2],
             "methods": "sgd,sam,asam,layerwise_sam,arsam,looksam",
             "cost_rounds": 10},
    # The second full view: an MLP trained to convergence (20 epochs of the
    # 60k training set), where the CNN preset can afford only 3 epochs.
    "full_mlp": {"tasks": lambda: [fashion_mlp_task(20)], "seeds": [0, 1, 2],
                 "methods": "sgd,sam,asam,layerwise_sam,arsam,looksam",
                 "cost_rounds": 10},
    # SAM's other documented benefit: robustness to noisy labels (Foret et
    # al. 2021, Sec. 4); 20% of the training labels replaced at random.
    "full_mlp_noise": {"tasks": lambda: [fashion_mlp_task(20,
                                                          label_noise=0.2)],
                       "seeds": [0, 1, 2],
                       "methods": "sgd,sam,asam,layerwise_sam,arsam,looksam",
                       "cost_rounds": 10},
    # Noisy labels hurt SGD once it trains long enough to memorize them.
    "full_mlp_noise_long": {"tasks": lambda: [fashion_mlp_task(
        60, label_noise=0.2)], "seeds": [0, 1, 2], "methods": "sgd,sam,asam",
                            "cost_rounds": 5},
    # Issue 13, the cost/benefit frontier: SAM's gain at near-SGD cost. The
    # methods are given on the command line (names with "@" settings).
    "frontier_digits": {"tasks": lambda: [digits_task(40)],
                        "seeds": [0, 1, 2, 3, 4], "methods": "sgd,sam",
                        "cost_rounds": 5},
    # SAM-ON needs normalization layers: the same MLP with LayerNorms.
    "frontier_digits_ln": {"tasks": lambda: [digits_task(40,
                                                         layer_norm=True)],
                           "seeds": [0, 1, 2], "methods": "sgd,sam,sam_on",
                           "cost_rounds": 5},
    "frontier_mlp": {"tasks": lambda: [fashion_mlp_task(60,
                                                        label_noise=0.2)],
                     "seeds": [0, 1, 2], "methods": "sgd,sam",
                     "cost_rounds": 5},
    # Few examples and many epochs: SGD fits the noisy labels (on 6,000
    # images for 12 epochs it did not, and SAM did not gain).
    "frontier_cnn": {"tasks": lambda: [fashion_task(
        40, train_examples=2000, width=8, label_noise=0.2)],
                     "seeds": [0, 1, 2], "methods": "sgd,sam",
                     "cost_rounds": 5},
    # The width-8 CNN under-fits 2,000 noisy images in 40 epochs (train loss
    # 1.05) and SAM lost there; width 16 and 60 epochs let SGD fit the noise.
    "frontier_cnn16": {"tasks": lambda: [fashion_task(
        60, train_examples=2000, width=16, label_noise=0.2,
        test_examples=2000)],
                       "seeds": [0, 1, 2], "methods": "sgd,sam",
                       "cost_rounds": 5},
    # LookSAM's alpha on clean tasks (the paper's 0.7 lost 2.5-6 points).
    "looksam_clean": {"tasks": lambda: [digits_task(40, noise=0.0),
                                        fashion_mlp_task(2)],
                      "seeds": [0, 1, 2], "methods": "sgd,sam",
                      "cost_rounds": 3},
    # The SAM paper's setting has augmentation: random crops and flips.
    "full_mlp_aug": {"tasks": lambda: [fashion_mlp_task(20, augment=True)],
                     "seeds": [0, 1, 2], "methods": "sgd,sam,asam",
                     "cost_rounds": 5},
}


# ------------------------------------------------------------------- cost


def _state_bytes(state) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)))


# A method's steps run one or more static programs (a layer selection, or
# recompute/reuse); each is a branch ``(name, extra update kwargs, fraction of
# the steps or None if unknown)``. Single-program methods have one branch
# named None.
Branch = tuple[Optional[str], dict[str, Any], Optional[float]]


def program_weights(built: dict[str, methods_lib.Method], params,
                    runs: Sequence[dict[str, Any]] = (), labels: Any = None
                    ) -> dict[str, list[Branch]]:
  """The static programs each method ran, weighted by the fraction of
  training steps (over all seeds) that ran them.

  Reuse methods driven by the host: recompute / reuse, by the runs' recompute
  fraction (None without runs). Layer-selective methods with a host-driven
  selection: every distinct selection in the runs' traces, by how often it
  was held (without runs: the policy's first selection). Others: one
  program.
  """
  groups = optax_sam.layer_groups(params, labels=labels)
  out: dict[str, list[Branch]] = {}
  for name, m in built.items():
    mine = [r for r in runs if r["method"] == name]
    if m.policy is not None:
      counts = cost_lib.held_selections(mine)
      if not counts:
        sel0 = m.policy.init(groups.num_groups, None).selection
        counts = {tuple(bool(f) for f in np.asarray(sel0)): 1}
      total = sum(counts.values())
      out[name] = [
          ("+".join(n for n, f in zip(groups.names, flags) if f),
           {"static_selection": flags}, c / total)
          for flags, c in sorted(counts.items(), key=lambda kv: -kv[1])]
      f = (float(np.mean([r.get("recompute_fraction", 1.0) for r in mine]))
           if mine else 1.0)
      if m.specialized and f < 1.0:
        # A schedule too (late-phase layer-wise SAM): each held selection's
        # recompute program by f x its share, and one SGD-step program.
        first = out[name][0][1]["static_selection"]
        out[name] = [(b, dict(e, static_recompute=True), w * f)
                     for b, e, w in out[name]] + [
                         ("reuse", {"static_selection": first,
                                    "static_recompute": False}, 1.0 - f)]
    elif m.specialized:
      f = (float(np.mean([r["recompute_fraction"] for r in mine]))
           if mine else None)
      out[name] = [("recompute", {"static_recompute": True}, f),
                   ("reuse", {"static_recompute": False},
                    None if f is None else 1.0 - f)]
    else:
      out[name] = [(None, {}, 1.0)]
  return out


def measure_cost(task: train_lib.Task, built: dict[str, methods_lib.Method],
                 runs: Sequence[dict[str, Any]] = (), *, rounds: int,
                 steps_per_round: int = 5) -> dict[str, Any]:
  """Compiled FLOPs, memory, state bytes, interleaved wall time per step.

  Every static program a method ran in ``runs`` (see
  :func:`program_weights`) is compiled and timed, interleaved with SGD in
  one process; a method that ran several is reported per program
  (``"method[branch]"``) and, when the fractions are known, amortized by the
  fraction of steps that ran each (``"method"``, with ``amortized: True``
  and the fractions).
  """
  (xtr, ytr), _ = task.load(0)
  model = task.model()
  x, y = jnp.asarray(xtr[:task.batch]), jnp.asarray(ytr[:task.batch])
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  loss_fn = train_lib.cross_entropy(model)
  groups = optax_sam.layer_groups(params, labels=task.labels)
  problem = cost_lib.Problem(task.name, params, loss_fn, False, (x, y),
                             groups, task.labels)
  weights = program_weights(built, params, runs, task.labels)
  rows, steps, init = {}, {}, {}
  bind = lambda f, kw: lambda p, s, *b: f(p, s, *b, **kw)
  for name, m in built.items():
    state = m.tx.init(params)
    fn = cost_lib.train_step_fn(m.tx, problem)
    for branch, extra, _ in weights[name]:
      key = name if branch is None else f"{name}[{branch}]"
      bound = bind(fn, extra)
      rows[key] = cost_lib.compiled_cost(bound, params, state, x, y)
      rows[key]["state_bytes"] = _state_bytes(state)
      if "static_selection" in extra:
        rows[key]["ascent_active"] = sum(
            s for f, s in zip(extra["static_selection"], groups.sizes)
            if f) / sum(groups.sizes)
      steps[key] = jax.jit(bound)
      init[key] = (params, state)
  times = cost_lib.interleaved_times(steps, init, (x, y), rounds=rounds,
                                     steps_per_round=steps_per_round)
  sgd = rows.get("sgd")
  for key, row in rows.items():
    row["step_s"] = times[key]["median_s"]
    if sgd is not None:
      row["flops_ratio"] = row["flops"] / sgd["flops"]
      row["time_ratio"] = row["step_s"] / times["sgd"]["median_s"]
      row["extra_state_bytes"] = row["state_bytes"] - sgd["state_bytes"]
  for name, branches in weights.items():
    if branches[0][0] is None or any(f is None for _, _, f in branches):
      continue  # one program, or fractions unknown (no runs)
    parts = [(rows[f"{name}[{b}]"], f) for b, _, f in branches]
    row = {"amortized": True,
           "fractions": {b: f for b, _, f in branches},
           "extra_state_bytes": parts[0][0].get("extra_state_bytes"),
           "temp_bytes": max(r["temp_bytes"] for r, _ in parts)}
    for k in ("flops_ratio", "time_ratio", "flops", "step_s",
              "ascent_active"):
      if all(k in r for r, _ in parts):
        row[k] = sum(f * r[k] for r, f in parts)
    if branches[0][0] == "recompute":
      row["recompute_fraction"] = branches[0][2]
    rows[name] = row
  return rows


# ---------------------------------------------------------------- benefit


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean/std over seeds, paired differences to SGD, budget accuracy."""
  by_method: dict[str, list[dict[str, Any]]] = {}
  for r in runs:
    by_method.setdefault(r["method"], []).append(r)
  sgd = {r["seed"]: r for r in by_method.get("sgd", [])}
  budget = (statistics.mean(r["train_time_s"] for r in sgd.values())
            if sgd else None)

  def ms(values):
    values = [v for v in values if v is not None]
    if not values:
      return None, None
    return (float(np.mean(values)),
            float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)

  out = {}
  for method, rs in by_method.items():
    row = {"seeds": [r["seed"] for r in rs]}
    for key in ("test_acc", "train_time_s", "grad_norm", "hessian_top_eig",
                "train_loss_subset", "recompute_fraction", "test_nll",
                "test_ece", "peak_test_acc"):
      row[key], row[key + "_std"] = ms([r.get(key) for r in rs])
    if sgd:
      diffs = [r["test_acc"] - sgd[r["seed"]]["test_acc"] for r in rs
               if r["seed"] in sgd]
      row["acc_minus_sgd"], row["acc_minus_sgd_std"] = ms(diffs)
      # Paired over seeds, like the accuracy (None for old records).
      for key in ("test_nll", "test_ece", "peak_test_acc"):
        d = [r[key] - sgd[r["seed"]][key] for r in rs
             if r["seed"] in sgd and r.get(key) is not None
             and sgd[r["seed"]].get(key) is not None]
        row[key + "_minus_sgd"], row[key + "_minus_sgd_std"] = ms(d)
      ratios = [r["train_time_s"] / sgd[r["seed"]]["train_time_s"]
                for r in rs if r["seed"] in sgd]
      row["train_time_ratio"], _ = ms(ratios)
      row["acc_at_sgd_budget"], _ = ms(
          [train_lib.accuracy_at_budget(r, budget) for r in rs])
    out[method] = row
  return out


def format_tables(task: str, cost: dict[str, Any],
                  summary: dict[str, Any]) -> str:
  """The terminal table of a task: REPORT.md's columns, with a legend."""
  return report_lib.terminal_table(task, cost, summary)


def _build(task: train_lib.Task, method_names, hparams):
  return {m: methods_lib.build(m, optax.sgd(0.01, momentum=0.9),
                               labels=task.labels, **hparams.get(m, {}))
          for m in method_names}


def recost(path: str, rounds: Optional[int] = None) -> dict[str, Any]:
  """Measures the cost section of a results file again, from its runs.

  The runs (accuracies, selection traces, recompute fractions) are kept;
  the cost of every program they ran is compiled and timed now, and the
  file gets a ``cost_provenance`` entry saying so.
  """
  with open(path) as f:
    res = json.load(f)
  preset = PRESETS[res["preset"]]
  tasks = {t.name: t for t in preset["tasks"]()}
  hparams = res.get("hparams", {})
  for name, r in res["results"].items():
    task = tasks[name]
    r["cost"] = measure_cost(task, _build(task, res["methods"], hparams),
                             r["runs"],
                             rounds=rounds or preset["cost_rounds"])
    print(format_tables(name, r["cost"], r["summary"]), flush=True)
  res["cost_provenance"] = provenance.provenance(res["provenance"]["seeds"])
  with open(path, "w") as f:
    json.dump(res, f, indent=1, default=float)
    f.write("\n")
  print(f"\nrewrote the cost section of {path}")
  return res


def _write_outputs(args, payload: dict[str, Any], seeds) -> Optional[str]:
  """Writes the results and redraws the report; returns the JSON's path.

  Without ``--record``: a new run folder ``benchmarks/runs/<UTC time>-<name>/``
  (git-ignored) with ``<name>.json``, its REPORT.md and PNGs. With
  ``--record``: ``benchmarks/results/<name>.json``, then REPORT.md (and
  README's generated block, for the default folder) from every recorded
  file, as ``python -m benchmarks.report`` does.
  """
  if args.no_write:
    return None
  name = args.name or args.preset
  if args.record:
    out_dir = args.results_dir or provenance.RESULTS_DIR
  else:
    out_dir = provenance.new_run_dir(name, args.runs_dir)
  path = provenance.write_result(name, payload, seeds=seeds,
                                 results_dir=out_dir)
  print(f"\nwrote {path}")
  _redraw(out_dir, args.record)
  return path


def _redraw(out_dir: str, recorded: bool) -> None:
  """REPORT.md and PNGs of ``out_dir``: a record (README's block too when
  it is ``benchmarks/results``; ``tiny`` files skipped) or a run folder."""
  readme = recorded and os.path.abspath(out_dir) == os.path.abspath(
      provenance.RESULTS_DIR)
  report_path, images = report_lib.write_report(
      out_dir, readme=report_lib.README if readme else None,
      include_tiny=not recorded,
      title=None if recorded else "## Results of this run (generated by "
      "`python -m benchmarks.run`; `python -m benchmarks.report "
      "--results-dir` redraws it)")
  print(f"wrote {report_path} and {len(images)} plot(s)"
        + (" and README's results block" if readme else ""))


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
  parser.add_argument("--methods", default=None,
                      help="comma-separated; default: the preset's")
  parser.add_argument("--seeds", default=None, help="e.g. 0,1,2")
  parser.add_argument("--hparams", default="",
                      help="per method, e.g. 'sam:rho=0.1,asam:rho=1.0'")
  parser.add_argument("--name", default=None,
                      help="results name (default: the preset): the run "
                      "folder's suffix, or with --record the file "
                      "benchmarks/results/<name>.json")
  parser.add_argument("--record", action="store_true",
                      help="write the committed record "
                      "benchmarks/results/<name>.json and regenerate "
                      "benchmarks/results/REPORT.md (and README's tables) "
                      "from every recorded file; without it, results go to "
                      "a new run folder benchmarks/runs/<UTC time>-<name>/ "
                      "with its own REPORT.md and plots")
  parser.add_argument("--results-dir", default=None,
                      help="with --record: the folder of recorded results "
                      "(default benchmarks/results; README is regenerated "
                      "for the default only)")
  parser.add_argument("--runs-dir", default=None,
                      help="without --record: where run folders are made "
                      "(default benchmarks/runs, git-ignored)")
  parser.add_argument("--no-write", action="store_true",
                      help="write no file; print the tables only")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress output: neither the 'run k of N' "
                      "lines nor the per-run bar")
  parser.add_argument("--no-bar", action="store_true",
                      help="no per-run tqdm bar (the 'run k of N' lines "
                      "stay)")
  parser.add_argument("--recost", default=None, metavar="RESULTS_JSON",
                      help="re-measure the cost section of a results file "
                      "from its recorded runs (no training), then redraw "
                      "the report of its folder")
  args = parser.parse_args(argv)
  if args.results_dir and not args.record:
    parser.error("--results-dir is the record's folder: it needs --record "
                 "(ad-hoc runs go to --runs-dir)")
  if args.record and (args.runs_dir or args.no_write):
    parser.error("--record writes benchmarks/results (or --results-dir): "
                 "not with --runs-dir or --no-write")
  provenance.record_start()
  if args.recost:
    res = recost(args.recost)
    folder = os.path.dirname(os.path.abspath(args.recost))
    _redraw(folder, folder == os.path.abspath(provenance.RESULTS_DIR))
    return res
  preset = PRESETS[args.preset]
  method_names = (args.methods or preset["methods"]).split(",")
  if "sgd" not in method_names:
    method_names = ["sgd"] + method_names
  seeds = ([int(s) for s in args.seeds.split(",")] if args.seeds
           else preset["seeds"])
  hparams = methods_lib.parse_hparams(args.hparams)
  tasks = preset["tasks"]()
  progress = progress_lib.Progress(
      [(t.name, m, s) for t in tasks for s in seeds for m in method_names],
      enabled=not args.no_progress)
  results = {}
  for task in tasks:
    runs = []
    for seed in seeds:
      data = task.load(seed)
      progress.set_steps(task.name,
                         task.epochs * (len(data[0][0]) // task.batch))
      for m in method_names:
        progress.start()
        runs.append(train_lib.train(
            task, m, seed, hparams=hparams.get(m, {}), data=data,
            progress=not (args.no_progress or args.no_bar)))
        progress.finish(runs[-1], task.name)
    summary = summarize(runs)
    progress.note(f"timing {task.name}'s programs interleaved with SGD "
                  f"({preset['cost_rounds']} rounds)")
    # Cost after training: every program the runs used, by how often.
    cost = measure_cost(task, _build(task, method_names, hparams), runs,
                        rounds=preset["cost_rounds"])
    task_info = {k: (v if not callable(v) else getattr(v, "__name__", "fn"))
                 for k, v in task._asdict().items()
                 if k not in ("load", "model")}
    results[task.name] = {"task": task_info,
                          "cost": cost, "summary": summary, "runs": runs}
    print(format_tables(task.name, cost, summary), flush=True)
  progress.done()
  print("\n" + report_lib.TIMING_NOTE)
  _write_outputs(args, {"preset": args.preset, "methods": method_names,
                        "hparams": hparams, "results": results}, seeds)
  return results


if __name__ == "__main__":
  main()
