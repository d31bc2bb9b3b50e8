"""Compiled cost and interleaved wall time of one training step.

For each method: FLOPs and bytes accessed of the compiled step
(``jax.jit(step).lower(...).compile().cost_analysis()``) as a ratio to the
plain (SGD) step of the same model, peak temporary memory from
``memory_analysis()``, the number of compilations, and the median wall time
per step with all methods interleaved in one process, as a ratio to SGD.

Run: ``python -m benchmarks.cost --models mlp,cnn`` (writes
``benchmarks/results/core_cost.json``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from benchmarks import provenance


class Problem(NamedTuple):
  name: str
  params: Any
  loss_fn: Callable[..., Any]
  has_aux: bool
  batch: tuple[Any, ...]
  groups: optax_sam.LayerGroups
  labels: Any = None  # layer labels used for ``groups`` (None: default)


def deep_tanh_mlp(depth: int, width: int, batch: int, *, scale: Any = None,
                  seed: int = 0) -> tuple[Any, Callable[..., Any], Any]:
  """A deep tanh MLP on random inputs: ``(params, loss_fn, x)``.

  Layers ``layer0`` ... with ``w ~ N(0, 1) / scale`` (default
  ``sqrt(width)``) and zero biases, tanh between them;
  ``loss_fn(params, x, y)`` is the mean squared error of the last layer's
  output. (The tests' deep MLP too.)
  """
  if scale is None:
    scale = np.sqrt(width)
  keys = jax.random.split(jax.random.PRNGKey(seed), depth + 1)
  params = {f"layer{i}": {"w": jax.random.normal(k, (width, width)) / scale,
                          "b": jnp.zeros(width)}
            for i, k in enumerate(keys[:depth])}

  def loss_fn(p, x, y):
    h = x
    for i in range(depth):
      h = h @ p[f"layer{i}"]["w"] + p[f"layer{i}"]["b"]
      if i < depth - 1:
        h = jnp.tanh(h)
    return jnp.mean(jnp.square(h - y))

  return params, loss_fn, jax.random.normal(keys[-1], (batch, width))


def mlp_problem(depth: int = 8, width: int = 256, batch: int = 128,
                seed: int = 0, image: Any = None) -> Problem:
  """A deep tanh MLP on random data (cost does not depend on the data)."""
  del image
  params, loss_fn, x = deep_tanh_mlp(depth, width, batch, seed=seed)
  return Problem("mlp", params, loss_fn, False, (x, x),
                 optax_sam.layer_groups(params))


def cnn_problem(batch: int = 128, seed: int = 0,
                image: tuple[int, int, int] = (32, 32, 3)) -> Problem:
  """The small Flax CNN (6 conv + 2 dense) on ``image``-shaped inputs."""
  from optax_sam.models.vision import SmallCNN  # pylint: disable=g-import-not-at-top
  model = SmallCNN(num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, *image))
  y = jnp.arange(batch) % 10
  params = model.init(jax.random.PRNGKey(seed), x[:1])["params"]

  def loss_fn(p, xb, yb):
    logits = model.apply({"params": p}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  return Problem("cnn", params, loss_fn, False, (x, y),
                 optax_sam.layer_groups(params))


def block_label(path: tuple[str, ...]) -> str:
  """ResNet layer = residual block (``stage2_block1``), stem or head."""
  return path[0]


def resnet18_problem(batch: int = 128, seed: int = 0,
                     image: tuple[int, int, int] = (32, 32, 3),
                     width: int = 64) -> Problem:
  """ResNet-18 (CIFAR form, BatchNorm); layers are residual blocks.

  ``loss_fn(params, batch_stats, x, y) -> (loss, new_batch_stats)``, so the
  batch is ``(batch_stats, x, y)`` and ``has_aux`` is True.
  """
  from optax_sam.models.vision import ResNet18  # pylint: disable=g-import-not-at-top
  model = ResNet18(num_classes=10, width=width)
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, *image))
  y = jnp.arange(batch) % 10
  variables = model.init(jax.random.PRNGKey(seed), x[:1])
  params, stats = variables["params"], variables["batch_stats"]

  def loss_fn(p, s, xb, yb):
    logits, new = model.apply({"params": p, "batch_stats": s}, xb,
                              train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return loss, new["batch_stats"]

  return Problem("resnet18", params, loss_fn, True, (stats, x, y),
                 optax_sam.layer_groups(params, labels=block_label),
                 block_label)


def lm_problem(batch: int = 32, seed: int = 0, image: Any = None,
               seq_len: int = 128, vocab: int = 65, d_model: int = 128,
               num_layers: int = 4) -> Problem:
  """The character-level Transformer LM on random tokens; next-token loss."""
  del image
  from optax_sam.models.lm import CharTransformerLM  # pylint: disable=g-import-not-at-top
  model = CharTransformerLM(vocab_size=vocab, d_model=d_model,
                            num_layers=num_layers, max_len=seq_len)
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 1),
                              (batch, seq_len + 1), 0, vocab)
  params = model.init(jax.random.PRNGKey(seed), tokens[:1, :-1])["params"]

  def loss_fn(p, tok):
    logits = model.apply({"params": p}, tok[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tok[:, 1:]).mean()

  return Problem("lm", params, loss_fn, False, (tokens,),
                 optax_sam.layer_groups(params))


def batches_for(problem: Problem, data: str, batch: int, seed: int):
  """``t -> batch args`` for training ``problem`` on ``data``.

  ``"random"``: the problem's fixed batch (cost does not depend on data).
  ``"fashion_mnist"``: shuffled Fashion-MNIST training batches (needs the
  Debian package ``dataset-fashion-mnist`` or ``FASHION_MNIST_DIR``).
  """
  prefix = problem.batch[:-2]  # e.g. BatchNorm statistics
  if data == "random":
    return lambda t: problem.batch
  if data != "fashion_mnist":
    raise ValueError(f"unknown data {data!r}")
  from benchmarks import data as data_lib  # pylint: disable=g-import-not-at-top
  (x, y), _ = data_lib.load_fashion_mnist()
  rng = np.random.default_rng(seed)
  per_epoch = len(x) // batch
  perm = rng.permutation(len(x))

  def get(t):
    nonlocal perm
    i = t % per_epoch
    if i == 0 and t:
      perm = rng.permutation(len(x))
    idx = perm[i * batch:(i + 1) * batch]
    return (*prefix, jnp.asarray(x[idx]), jnp.asarray(y[idx]))

  return get


PROBLEMS = {"mlp": mlp_problem, "cnn": cnn_problem,
            "resnet18": resnet18_problem, "lm": lm_problem}


def core_methods(problem: Problem) -> dict[str, optax.GradientTransformation]:
  """SGD, full SAM/ASAM, and SAM restricted to one static layer."""
  base = lambda: optax.sgd(0.01, momentum=0.9)
  names = problem.groups.names
  mid = names[len(names) // 2]
  return {
      "sgd": optax_sam.plain(base()),
      "sam": optax_sam.sam(base(), rho=0.05),
      "asam": optax_sam.asam(base(), rho=0.5),
      f"sam[last={names[-1]}]": optax_sam.sam(
          base(), perturb=problem.groups.mask([names[-1]])),
      f"sam[mid={mid}]": optax_sam.sam(
          base(), perturb=problem.groups.mask([mid])),
  }


def train_step_fn(tx, problem: Problem):
  """A full training step: both passes, optimizer, apply_updates."""
  step = optax_sam.make_update(tx, problem.loss_fn, has_aux=problem.has_aux)

  def train_step(params, state, *batch, **extra_args):
    (loss, _), updates, state = step(params, state, *batch, **extra_args)
    return optax.apply_updates(params, updates), state, loss

  return train_step


def compiled_cost(fn, *args) -> dict[str, float]:
  """FLOPs, bytes accessed, temp memory and compile time of ``jit(fn)``."""
  lowered = jax.jit(fn).lower(*args)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax returns a list
    ca = ca[0]
  out = {"flops": float(ca.get("flops", float("nan"))),
         "bytes_accessed": float(ca.get("bytes accessed", float("nan"))),
         "compile_s": compile_s}
  try:
    mem = compiled.memory_analysis()
    out["temp_bytes"] = float(mem.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    out["temp_bytes"] = float("nan")
  return out


def interleaved_times(steps: dict[str, Callable[..., Any]],
                      init: dict[str, tuple[Any, Any]], batch, *,
                      rounds: int, steps_per_round: int) -> dict[str, Any]:
  """Median seconds per step, methods interleaved round by round."""
  carries = dict(init)
  for name, fn in steps.items():  # warm-up (compilation) outside timing
    p, s, _ = fn(*carries[name], *batch)
    jax.block_until_ready(p)
    carries[name] = (p, s)
  per_round = {name: [] for name in steps}
  for _ in range(rounds):
    for name, fn in steps.items():
      p, s = carries[name]
      t0 = time.perf_counter()
      for _ in range(steps_per_round):
        p, s, _ = fn(p, s, *batch)
      jax.block_until_ready(p)
      per_round[name].append((time.perf_counter() - t0) / steps_per_round)
      carries[name] = (p, s)
  return {name: {"median_s": statistics.median(v), "all_s": v}
          for name, v in per_round.items()}


def measure(problem: Problem, methods: dict[str, Any], *, rounds: int,
            steps_per_round: int) -> dict[str, Any]:
  """Cost table of ``methods`` on ``problem`` (ratios to the 'sgd' entry)."""
  sgd_grad = compiled_cost(jax.grad(problem.loss_fn, has_aux=problem.has_aux),
                           problem.params, *problem.batch)["flops"]
  rows, steps, init = {}, {}, {}
  for name, tx in methods.items():
    state = tx.init(problem.params)
    fn = train_step_fn(tx, problem)
    rows[name] = compiled_cost(fn, problem.params, state, *problem.batch)
    rows[name]["flops_per_sgd_grad"] = rows[name]["flops"] / sgd_grad
    steps[name] = jax.jit(fn)
    init[name] = (problem.params, state)
  times = interleaved_times(steps, init, problem.batch, rounds=rounds,
                            steps_per_round=steps_per_round)
  for name in methods:
    rows[name]["step_s"] = times[name]["median_s"]
    rows[name]["step_s_rounds"] = times[name]["all_s"]
    rows[name]["compilations"] = steps[name]._cache_size()  # pylint: disable=protected-access
  base = rows["sgd"]
  for row in rows.values():
    row["flops_ratio"] = row["flops"] / base["flops"]
    row["time_ratio"] = row["step_s"] / base["step_s"]
  return {"sgd_gradient_flops": sgd_grad,
          "param_count": int(sum(np.size(x) for x in
                                 jax.tree.leaves(problem.params))),
          "groups": problem.groups.describe(), "methods": rows}


def format_table(model: str, result: dict[str, Any]) -> str:
  lines = [f"\n{model}: FLOPs and wall time per training step vs SGD",
           f"{'method':<28}{'FLOPs/SGD':>10}{'FLOPs/grad':>11}"
           f"{'time/SGD':>10}{'ms/step':>9}{'compiles':>9}"]
  for name, r in result["methods"].items():
    lines.append(f"{name:<28}{r['flops_ratio']:>10.3f}"
                 f"{r['flops_per_sgd_grad']:>11.3f}{r['time_ratio']:>10.3f}"
                 f"{1e3 * r['step_s']:>9.2f}{r['compilations']:>9d}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--batch", type=int, default=None,
                      help="batch size (default: each model's)")
  parser.add_argument("--steps-per-round", type=int, default=10)
  parser.add_argument("--name", default="core_cost")
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args(argv)
  provenance.record_start()
  results = {}
  for model in args.models.split(","):
    problem = PROBLEMS[model](**({"batch": args.batch} if args.batch
                                 else {}))
    results[model] = measure(problem, core_methods(problem),
                             rounds=args.rounds,
                             steps_per_round=args.steps_per_round)
    print(format_table(model, results[model]), flush=True)
  if not args.no_write:
    path = provenance.write_result(
        args.name, {"settings": vars(args), "results": results}, seeds=[0])
    print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
