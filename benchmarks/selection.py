"""Executors of the selection engine against the equivalent static subset.

A top-k-of-L policy re-selected every N steps (by the per-layer norms of the
descent gradient) drives ``optax_sam.sharpness_aware(policy=...)`` with the
``switch`` and the ``specialize`` executors. In the same loop, interleaved
step by step, the benchmark also times SGD and the *equivalent static subset*:
plain ``optax_sam.sam(mask=mask)`` compiled for the subset the policy currently
holds (warmed up before it is timed). Reported per model:

* compiled FLOPs of every branch / subset, the fraction of steps spent in
  each, and the amortized FLOPs of each executor and of the static subsets,
  as ratios to SGD and to the static equivalent;
* wall time per step (mean over the timed steps, compilation steps excluded
  and counted apart) as ratios to SGD and to the static equivalent;
* compile time, number of compilations, temporary memory of each program.

Run: ``python -m benchmarks.selection --models cnn,resnet18 --steps 300
--every 100`` (writes ``benchmarks/results/selection.json``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from benchmarks import cost as cost_lib
from benchmarks import provenance

try:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
except ImportError:  # progress bars are optional
  tqdm = lambda x, **_: x  # noqa: E731


def _subset_name(groups, flags) -> str:
  return "+".join(n for n, f in zip(groups.names, flags) if f)


def run(problem: cost_lib.Problem, batches, *, steps: int, every: int, k: int,
        lr: float, rho: float, seed: int,
        switch_steps: Optional[int] = None) -> dict[str, Any]:
  """Trains ``steps`` steps; see the module docstring.

  The ``switch`` run is timed on its first ``switch_steps`` steps only (all
  by default): on CPU, XLA runs convolution gradients inside a conditional
  far slower than outside (jax-ml/jax#12868), which would make long runs of
  it on conv nets take hours.
  """
  switch_steps = steps if switch_steps is None else switch_steps
  groups = problem.groups
  base = lambda: optax.sgd(lr, momentum=0.9)
  policy = optax_sam.policies.reselect_every(optax_sam.policies.top_k(k), every)
  dyn = {ex: optax_sam.sharpness_aware(
      base(), rho=rho, policy=policy, unselected="perturbed", executor=ex,
      labels=problem.labels, seed=seed)
         for ex in ("switch", "specialize")}
  sgd = optax_sam.plain(base())

  def train(tx):
    return cost_lib.train_step_fn(tx, problem)

  # Programs.
  switch_step = jax.jit(train(dyn["switch"]))
  spec_update = optax_sam.SpecializedStep(dyn["specialize"], problem.loss_fn,
                                          has_aux=problem.has_aux)
  sgd_step = jax.jit(train(sgd))
  static_steps: dict[tuple[bool, ...], Any] = {}

  def static_program(flags):
    if flags not in static_steps:
      tx = optax_sam.sam(base(), rho=rho, mask=groups.mask_from_flags(flags))
      fn = jax.jit(train(tx))
      state = tx.init(problem.params)
      out = fn(problem.params, state, *problem.batch)  # compile outside timing
      jax.block_until_ready(out)
      static_steps[flags] = (fn, state)
    return static_steps[flags]

  carry = {"switch": (problem.params, dyn["switch"].init(problem.params)),
           "specialize": (problem.params,
                          dyn["specialize"].init(problem.params)),
           "sgd": (problem.params, sgd.init(problem.params))}
  # Compile SGD and the switch program before timing.
  for name, fn in (("sgd", sgd_step), ("switch", switch_step)):
    jax.block_until_ready(fn(*carry[name], *problem.batch))
  times = {m: [] for m in ("sgd", "switch", "specialize", "static")}
  compile_steps = []
  trace = []
  for t in tqdm(range(steps), desc=problem.name, leave=False):
    batch = batches(t)
    for name, fn in (("sgd", sgd_step), ("switch", switch_step)):
      if name == "switch" and t >= switch_steps:
        continue
      p, s = carry[name]
      t0 = time.perf_counter()
      p, s, _ = fn(p, s, *batch)
      jax.block_until_ready(p)
      times[name].append(time.perf_counter() - t0)
      carry[name] = (p, s)
    # specialize executor (its selection trace is the reference trace)
    p, s = carry["specialize"]
    flags = tuple(bool(f) for f in np.asarray(s.policy.selection))
    n0 = spec_update.compilations
    t0 = time.perf_counter()
    (_, _), u, s = spec_update(p, s, *batch)
    p = optax.apply_updates(p, u)
    jax.block_until_ready(p)
    dt = time.perf_counter() - t0
    if spec_update.compilations > n0:
      compile_steps.append(dt)
    else:
      times["specialize"].append(dt)
    carry["specialize"] = (p, s)
    trace.append(flags)
    # the equivalent static subset, on the same weights
    fn, st = static_program(flags)
    t0 = time.perf_counter()
    out = fn(p, st, *batch)
    jax.block_until_ready(out)
    times["static"].append(time.perf_counter() - t0)

  # Compiled cost of each program.
  sgd_cost = cost_lib.compiled_cost(train(sgd), problem.params,
                                    sgd.init(problem.params), *problem.batch)
  spec_tx = dyn["specialize"]
  spec_state = spec_tx.init(problem.params)
  spec_train = train(spec_tx)

  def subset_cost(flags):
    return cost_lib.compiled_cost(
        lambda p, s, *b: spec_train(p, s, *b, static_selection=flags),
        problem.params, spec_state, *problem.batch)

  menu = optax_sam.executors.depth_menu(groups.num_groups)
  branch_of = [int(menu.cover(jnp.asarray(f))) for f in trace]
  branch_counts = np.bincount(branch_of, minlength=len(menu.entries))
  branches = []
  for i, entry in enumerate(menu.entries):
    if branch_counts[i]:
      c = subset_cost(entry)
      branches.append({"branch": i, "lowest_group": groups.names[
          entry.index(True)], "fraction": branch_counts[i] / steps,
                       "flops_ratio": c["flops"] / sgd_cost["flops"]})
  subsets = {}
  for flags in trace:
    subsets.setdefault(flags, 0)
    subsets[flags] += 1
  subset_rows = []
  for flags, n in subsets.items():
    static_tx = optax_sam.sam(base(), rho=rho,
                              mask=groups.mask_from_flags(flags))
    st_cost = cost_lib.compiled_cost(train(static_tx), problem.params,
                                     static_tx.init(problem.params),
                                     *problem.batch)
    sp_cost = subset_cost(flags)
    subset_rows.append({
        "subset": _subset_name(groups, flags), "fraction": n / steps,
        "static_flops_ratio": st_cost["flops"] / sgd_cost["flops"],
        "specialize_flops_ratio": sp_cost["flops"] / sgd_cost["flops"],
        "specialize_compile_s": sp_cost["compile_s"],
        "specialize_temp_bytes": sp_cost["temp_bytes"],
        "static_temp_bytes": st_cost["temp_bytes"]})
  switch_cost = cost_lib.compiled_cost(
      train(dyn["switch"]), problem.params,
      dyn["switch"].init(problem.params), *problem.batch)

  # The switch run, while it ran, must have made the same selections.
  sw_sel = np.asarray(carry["switch"][1].last_selection)
  switch_agrees = bool((sw_sel == np.asarray(trace[min(steps, switch_steps)
                                                   - 1])).all())
  amort_static = sum(r["fraction"] * r["static_flops_ratio"]
                     for r in subset_rows)
  amort_spec = sum(r["fraction"] * r["specialize_flops_ratio"]
                   for r in subset_rows)
  amort_switch = sum(b["fraction"] * b["flops_ratio"] for b in branches)
  mean = {m: float(np.mean(v)) for m, v in times.items()}
  median = {m: float(np.median(v)) for m, v in times.items()}
  return {
      "groups": groups.describe(), "k": k, "every": every, "steps": steps,
      "selections": [_subset_name(groups, f) for f in trace[::every]],
      "switch_trace_agrees": switch_agrees,
      "flops": {
          "sgd": sgd_cost["flops"],
          "amortized_ratio_to_sgd": {"static": amort_static,
                                     "switch": amort_switch,
                                     "specialize": amort_spec},
          "ratio_to_static": {"switch": amort_switch / amort_static,
                              "specialize": amort_spec / amort_static},
          "switch_branches": branches, "subsets": subset_rows,
      },
      "wall": {
          "mean_s": mean, "median_s": median,
          "mean_ratio_to_sgd": {m: mean[m] / mean["sgd"] for m in mean},
          "mean_ratio_to_static": {m: mean[m] / mean["static"]
                                   for m in mean},
          "steps_timed": {m: len(v) for m, v in times.items()},
      },
      "compile": {
          "switch_compilations": switch_step._cache_size(),  # pylint: disable=protected-access
          "switch_compile_s": switch_cost["compile_s"],
          "switch_temp_bytes": switch_cost["temp_bytes"],
          "switch_num_branches": len(menu.entries),
          "specialize_compilations": spec_update.compilations,
          "specialize_steps_with_compile_s": compile_steps,
      },
  }


def format_result(name: str, r: dict[str, Any]) -> str:
  f, w = r["flops"], r["wall"]
  lines = [f"\n{name}: top-{r['k']} of {len(r['groups'])} groups, "
           f"re-selected every {r['every']} steps, {r['steps']} steps",
           f"  selections: {r['selections']}",
           f"{'':<12}{'FLOPs/SGD':>10}{'FLOPs/static':>13}"
           f"{'time/SGD':>10}{'time/static':>12}"]
  for m in ("static", "switch", "specialize"):
    fl = f["amortized_ratio_to_sgd"][m]
    per_static = fl / f["amortized_ratio_to_sgd"]["static"]
    lines.append(f"  {m:<10}{fl:>10.3f}{per_static:>13.3f}"
                 f"{w['mean_ratio_to_sgd'][m]:>10.3f}"
                 f"{w['mean_ratio_to_static'][m]:>12.3f}")
  c = r["compile"]
  lines.append(f"  switch: {c['switch_num_branches']} branches, compiled "
               f"{c['switch_compilations']}x in {c['switch_compile_s']:.1f}s;"
               f" specialize: {c['specialize_compilations']} programs")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="cnn,resnet18")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--every", type=int, default=100)
  parser.add_argument("--k", type=int, default=2)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--resnet-width", type=int, default=16,
                      help="ResNet-18 first-stage width (64 in the paper)")
  parser.add_argument("--data", default="fashion_mnist",
                      choices=("fashion_mnist", "random"))
  parser.add_argument("--switch-steps", type=int, default=None,
                      help="time the switch executor on this many steps")
  parser.add_argument("--name", default="selection")
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args(argv)
  provenance.record_start()
  results = {}
  for model in args.models.split(","):
    kwargs = {"batch": args.batch, "seed": args.seed,
              "image": (28, 28, 1) if args.data == "fashion_mnist"
              else (32, 32, 3)}
    if model == "resnet18":
      kwargs["width"] = args.resnet_width
    problem = cost_lib.PROBLEMS[model](**kwargs)
    batches = cost_lib.batches_for(problem, args.data, args.batch, args.seed)
    results[model] = run(problem, batches, steps=args.steps,
                         every=args.every, k=args.k, lr=args.lr, rho=args.rho,
                         seed=args.seed, switch_steps=args.switch_steps)
    print(format_result(model, results[model]), flush=True)
  if not args.no_write:
    path = provenance.write_result(
        args.name, {"settings": vars(args), "results": results},
        seeds=[args.seed])
    print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
