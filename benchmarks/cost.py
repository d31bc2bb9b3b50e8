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
import functools
import re
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

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


def _model_rule(conv_backward: str) -> str:
  """The model's own rule for a ``make_update`` rule: the forward form in
  the model only when every pass asks for it ("auto" rewrites the
  conditional passes itself)."""
  return "forward" if conv_backward == "forward" else "xla"


def cnn_problem(batch: int = 128, seed: int = 0,
                image: tuple[int, int, int] = (32, 32, 3),
                conv_backward: str = "auto") -> Problem:
  """The small Flax CNN (6 conv + 2 dense) on ``image``-shaped inputs."""
  from optax_sam.models.vision import SmallCNN  # pylint: disable=g-import-not-at-top
  model = SmallCNN(num_classes=10, conv_backward=_model_rule(conv_backward))
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
                     width: int = 64, conv_backward: str = "auto") -> Problem:
  """ResNet-18 (CIFAR form, BatchNorm); layers are residual blocks.

  ``loss_fn(params, batch_stats, x, y) -> (loss, new_batch_stats)``, so the
  batch is ``(batch_stats, x, y)`` and ``has_aux`` is True.
  """
  from optax_sam.models.vision import ResNet18  # pylint: disable=g-import-not-at-top
  model = ResNet18(num_classes=10, width=width,
                   conv_backward=_model_rule(conv_backward))
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
          base(), mask=problem.groups.mask([names[-1]])),
      f"sam[mid={mid}]": optax_sam.sam(
          base(), mask=problem.groups.mask([mid])),
  }


def registered_methods(problem: Problem, names: list[str]
                       ) -> tuple[dict[str, Any], dict[str, str]]:
  """``benchmarks.methods`` entries by name (SGD-momentum base as in
  :func:`core_methods`; ``"sgd"`` always first), and the ones that cannot run
  on ``problem`` with the reason (e.g. SAM-ON on a model without
  normalization layers), found by tracing one step."""
  from benchmarks import methods as methods_lib  # pylint: disable=g-import-not-at-top
  out, skipped = {}, {}
  for name in ["sgd"] + [n for n in names if n != "sgd"]:
    tx = methods_lib.build(name, optax.sgd(0.01, momentum=0.9),
                           labels=problem.labels).tx
    try:
      jax.eval_shape(train_step_fn(tx, problem), problem.params,
                     tx.init(problem.params), *problem.batch)
    except ValueError as e:
      skipped[name] = str(e)
      continue
    out[name] = tx
  return out, skipped


def train_step_fn(tx, problem: Problem, conv_backward: str = "auto"):
  """A full training step: both passes, optimizer, apply_updates."""
  step = optax_sam.make_update(tx, problem.loss_fn, has_aux=problem.has_aux,
                               conv_backward=conv_backward)

  def train_step(params, state, *batch, **extra_args):
    (loss, _), updates, state = step(params, state, *batch, **extra_args)
    return optax.apply_updates(params, updates), state, loss

  return train_step


# Instructions of an optimized HLO module's entry computation that do no
# work of their own (the rest, fusions, dots, copies, custom calls, loops,
# conditionals, each run as at least one kernel).
_NO_KERNEL = frozenset({"parameter", "constant", "get-tuple-element", "tuple",
                        "bitcast"})


def kernel_count(hlo_text: str) -> int:
  """The number of kernels of a compiled program's top level: instructions
  of its optimized HLO's ``ENTRY`` computation other than parameters,
  constants, tuples and bitcasts. On the CPU each costs a few microseconds
  however small, so a small model's step time follows this count rather
  than its FLOPs."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  entry = entry[:entry.find("\n}") if "\n}" in entry else len(entry)]
  ops = re.findall(r"^\s*(?:ROOT )?\S+ = .*? ([a-z][\w-]*)\(", entry, re.M)
  return sum(op not in _NO_KERNEL for op in ops)


def compiled_cost(fn, *args) -> dict[str, float]:
  """FLOPs, bytes accessed, temp memory, kernel count (:func:`kernel_count`)
  and compile time of ``jit(fn)``."""
  lowered = jax.jit(fn).lower(*args)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax returns a list
    ca = ca[0]
  text = lowered.as_text()
  out = {"flops": float(ca.get("flops", float("nan"))),
         "bytes_accessed": float(ca.get("bytes accessed", float("nan"))),
         "compile_s": compile_s,
         # XLA's cost analysis counts a conditional as its costliest branch,
         # and a loop's body once (not times its trip count).
         "conditional": "stablehlo.case" in text or "stablehlo.if" in text,
         "loop": "stablehlo.while" in text}
  try:
    out["kernels"] = kernel_count(compiled.as_text())
  except (ValueError, AttributeError):  # no text form on this backend
    pass
  try:
    mem = compiled.memory_analysis()
    out["temp_bytes"] = float(mem.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    out["temp_bytes"] = float("nan")
  return out


def interleaved_times(steps: dict[str, Callable[..., Any]],
                      init: dict[str, tuple[Any, Any]], batch, *,
                      rounds: int, steps_per_round: int,
                      progress: bool = False) -> dict[str, Any]:
  """Median seconds per step, methods interleaved round by round."""
  carries = dict(init)
  for name, fn in _progress(steps.items(), progress, "compile"):
    p, s, _ = fn(*carries[name], *batch)  # warm-up (compilation)
    jax.block_until_ready(p)
    carries[name] = (p, s)
  per_round = {name: [] for name in steps}
  for _ in _progress(range(rounds), progress, "rounds"):
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


def _progress(it, enabled: bool, desc: str):
  if not enabled:
    return it
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return it
  return tqdm(list(it), desc=desc, leave=False)


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


# ------------------------------------------------------------- executors


def handwritten_sam_step(problem: Problem, rho: float = 0.05,
                         lr: float = 0.01):
  """Two-pass SAM written by hand in one function (the overhead baseline)."""
  opt = optax.sgd(lr, momentum=0.9)
  grad = jax.value_and_grad(problem.loss_fn, has_aux=problem.has_aux)

  def step(params, state, *batch):
    loss, g = grad(params, *batch)
    scale = rho / jnp.maximum(optax.global_norm(g), 1e-12)
    adv = jax.tree.map(lambda p, x: p + scale * x, params, g)
    _, g_adv = grad(adv, *batch)
    updates, state = opt.update(g_adv, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step, opt.init(problem.params)


class Program(NamedTuple):
  """A jitted step and its initial state; ``force`` rewrites the state
  before every call (outside jit: the decision stays a run-time value)."""
  fn: Callable[..., Any]
  state: Any
  force: Callable[[Any], Any] = lambda s: s


def _forcing(fn, force):
  jitted = jax.jit(fn)
  return lambda p, s, *b: jitted(p, force(s), *b)


def _force_selection(flags):
  sel = jnp.asarray(np.array(flags, bool))
  return lambda s: s._replace(policy=s.policy._replace(selection=sel))


def _force_recompute(value: bool):
  v = jnp.asarray(value)
  return lambda s: s._replace(next_recompute=v)


def _suffix(groups: optax_sam.LayerGroups, start: int) -> tuple[bool, ...]:
  return tuple(i >= start for i in range(groups.num_groups))


def _name(groups, flags) -> str:
  return "+".join(n for n, f in zip(groups.names, flags) if f)


def executor_programs(problem: Problem, conv_backward: str,
                      selections: dict[tuple[bool, ...], float],
                      suffix_start: int) -> dict[str, Program]:
  """Every program of the executor table, for one ``conv_backward``.

  * ``sgd``, ``sam``, ``sam_handwritten`` (two passes by hand, one jit);
  * the static subset "groups ``suffix_start`` to the output" as plain
    ``sam(mask=...)`` and through the engine with a fixed policy
    (``unselected="perturbed"``, the same work) and each executor
    (``switch`` takes exactly that branch of its depth menu, so it does the
    same work as the static program; ``auto`` is what a user gets);
  * ``layerwise_sam`` with its default executor, in the paper's form
    (``unselected="clean"``, the default) and in the 0.1 form
    (``layerwise_sam_perturbed``), its state's selection set to each of
    ``selections`` before every step;
  * ``arsam`` (its ``lax.cond`` program) with the recompute decision set;
  * compositions, on the most held selection: ``layerwise_reuse``
    (``layerwise_sam(..., schedule=recompute_every(4))``) and
    ``arsam_top_k`` (``arsam(..., policy=top_k(k))``), each with the
    selection and the recompute decision set.
  """
  base = lambda: optax.sgd(0.01, momentum=0.9)
  groups = problem.groups
  flags = _suffix(groups, suffix_start)
  mask = groups.mask_from_flags(flags)
  train = lambda tx: train_step_fn(tx, problem, conv_backward)
  progs: dict[str, Program] = {}

  def add(name, tx, force=None, **extra):
    fn = train(tx)
    if extra:
      fn = (lambda f, kw: lambda p, s, *b: f(p, s, *b, **kw))(fn, extra)
    progs[name] = Program(fn, tx.init(problem.params),
                          *([force] if force else []))

  add("sgd", optax_sam.plain(base()))
  add("sam", optax_sam.sam(base(), rho=0.05))
  hand, hand_state = handwritten_sam_step(problem)
  progs["sam_handwritten"] = Program(hand, hand_state)
  sub = f"{groups.names[suffix_start]}.."  # groups suffix_start..output
  add(f"static[{sub}]", optax_sam.sam(base(), rho=0.05, mask=mask))
  for ex in ("auto", "switch", "dense", "specialize"):
    tx = optax_sam.sharpness_aware(
        base(), rho=0.05, policy=optax_sam.policies.fixed(flags),
        unselected="perturbed", executor=ex, labels=problem.labels)
    extra = {"static_selection": flags} if ex == "specialize" else {}
    add(f"{ex}[{sub}]", tx, **extra)
  for sel in selections:
    for name, unselected in (("layerwise_sam", "clean"),
                             ("layerwise_sam_perturbed", "perturbed")):
      tx = optax_sam.layerwise_sam(base(), rho=0.05, num_layers=sum(sel),
                                   unselected=unselected,
                                   labels=problem.labels)
      add(f"{name}[{_name(groups, sel)}]", tx, _force_selection(sel))
  top = max(selections, key=selections.get) if selections else flags
  both = lambda *fs: (lambda s: functools.reduce(lambda a, f: f(a), fs, s))
  for value, branch in ((True, "recompute"), (False, "reuse")):
    add(f"arsam[{branch}]", optax_sam.arsam(base(), rho=0.05),
        _force_recompute(value))
    tx = optax_sam.layerwise_sam(
        base(), rho=0.05, num_layers=sum(top), labels=problem.labels,
        schedule=optax_sam.schedules.recompute_every(4))
    add(f"layerwise_reuse[{_name(groups, top)}][{branch}]", tx,
        both(_force_selection(top), _force_recompute(value)))
    tx = optax_sam.arsam(base(), rho=0.05, labels=problem.labels,
                         policy=optax_sam.policies.top_k(sum(top)))
    add(f"arsam_top_k[{_name(groups, top)}][{branch}]", tx,
        both(_force_selection(top), _force_recompute(value)))
  return progs


def measure_executors(problems: dict[str, Problem], *,
                      selections: dict[tuple[bool, ...], float],
                      recompute_fraction: Optional[float],
                      suffix_start: int, rounds: int, steps_per_round: int,
                      progress: bool = False,
                      only: Optional[tuple[str, ...]] = None
                      ) -> dict[str, Any]:
  """The executor table of one model: every program of
  :func:`executor_programs` for each backward rule (``problems`` maps a
  ``conv_backward`` to the model built with it), compiled FLOPs and wall
  time, all interleaved in one loop; ratios to the SGD step of the same
  backward rule, and amortized rows for layer-wise SAM (over
  ``selections``' fractions) and ARSAM (``recompute_fraction``)."""
  rows, timed, init = {}, {}, {}
  conv_modes = tuple(problems)
  problem = next(iter(problems.values()))
  for mode, prob in problems.items():
    for name, prog in executor_programs(prob, mode, selections,
                                        suffix_start).items():
      if only and name != "sgd" and name.split("[")[0] not in only:
        continue
      key = f"{mode}/{name}"
      state = prog.force(prog.state)
      rows[key] = compiled_cost(prog.fn, problem.params, state,
                                *problem.batch)
      timed[key] = _forcing(prog.fn, prog.force)
      init[key] = (problem.params, prog.state)
  times = interleaved_times(timed, init, problem.batch, rounds=rounds,
                            steps_per_round=steps_per_round,
                            progress=progress)
  for key, row in rows.items():
    mode = key.split("/")[0]
    row["step_s"] = times[key]["median_s"]
    row["step_s_rounds"] = times[key]["all_s"]
    row["flops_ratio"] = row["flops"] / rows[f"{mode}/sgd"]["flops"]
    row["time_ratio"] = row["step_s"] / rows[f"{mode}/sgd"]["step_s"]
  for mode in conv_modes:
    for name in ("layerwise_sam", "layerwise_sam_perturbed"):
      keys = {_name(problem.groups, sel): f for sel, f in selections.items()}
      parts = [(rows[f"{mode}/{name}[{k}]"], f) for k, f in keys.items()
               if f"{mode}/{name}[{k}]" in rows]
      if parts and len(parts) == len(selections):
        rows[f"{mode}/{name}"] = _amortized(parts, keys)
    fracs = {"arsam": recompute_fraction, "layerwise_reuse": 0.25,
             "arsam_top_k": recompute_fraction}
    for key in list(rows):
      m, _, rest = key.partition("/")
      name = rest.split("[")[0]
      if (m != mode or not rest.endswith("[recompute]")
          or fracs.get(name) is None):
        continue
      f, head = fracs[name], rest[:-len("[recompute]")]
      reuse_key = f"{mode}/{head}[reuse]"
      if reuse_key in rows:
        rows[f"{mode}/{head}"] = _amortized(
            [(rows[key], f), (rows[reuse_key], 1.0 - f)],
            {"recompute": f, "reuse": 1.0 - f})
  return {"groups": problem.groups.describe(), "suffix_start": suffix_start,
          "conv_modes": list(conv_modes), "methods": rows}


def _amortized(parts, fractions) -> dict[str, Any]:
  """Fraction-weighted wall time; FLOPs only when no part branches (the
  compiled FLOPs of a conditional are those of its costliest branch)."""
  total = sum(f for _, f in parts)
  row = {"amortized": True, "fractions": fractions,
         "conditional": any(r.get("conditional") for r, _ in parts)}
  for k in ("flops_ratio", "time_ratio", "flops", "step_s"):
    row[k] = (None if k.startswith("flops") and row["conditional"]
              else sum(f * r[k] for r, f in parts) / total)
  return row


def default_selections(groups: optax_sam.LayerGroups
                       ) -> dict[tuple[bool, ...], float]:
  """Two top-2 selections, weighted equally, for a model without recorded
  ones: the output side (the depth menu's cheapest case) and the two input
  layers (its costliest: the backward pass reaches the input)."""
  n = groups.num_groups
  out = tuple(i >= n - 2 for i in range(n))
  inp = tuple(i < 2 for i in range(n))
  return {out: 0.5, inp: 0.5}


def held_selections(runs) -> dict[tuple[bool, ...], int]:
  """How many recorded steps each layer selection was held, over ``runs``
  (result rows with a ``selection.trace`` of ``(step, flags)``)."""
  counts: dict[tuple[bool, ...], int] = {}
  for r in runs:
    for _, flags in (r.get("selection") or {}).get("trace", []):
      key = tuple(bool(f) for f in flags)
      counts[key] = counts.get(key, 0) + 1
  return counts


def selections_from_results(path: str, task: str, method: str,
                            top: int = 4) -> tuple[dict, Optional[float]]:
  """The ``top`` most held layer selections of ``method``'s runs in a
  results file, as fractions of the steps they cover (renormalised), and
  ARSAM's mean recompute fraction in the same task (None if absent)."""
  import json  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    res = json.load(f)["results"][task]
  counts = held_selections(r for r in res["runs"] if r["method"] == method)
  best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
  total = sum(c for _, c in best) or 1
  rec = [r["recompute_fraction"] for r in res["runs"]
         if r["method"] == "arsam" and r.get("recompute_fraction") is not None]
  return ({k: c / total for k, c in best},
          float(np.mean(rec)) if rec else None)


def format_executor_table(model: str, result: dict[str, Any]) -> str:
  lines = [f"\n{model}: executors and backward rules, per step vs SGD of the"
           " same rule (FLOPs*: a conditional program, its costliest branch)",
           f"{'program':<46}{'FLOPs/SGD':>10}{'time/SGD':>10}{'ms/step':>9}"]
  for name, r in result["methods"].items():
    tag = " (amortized)" if r.get("amortized") else ""
    fl = ("      -   " if r["flops_ratio"] is None else
          f"{r['flops_ratio']:>9.3f}" + ("*" if r.get("conditional") else " "))
    lines.append(f"{name + tag:<46}{fl:>10}"
                 f"{r['time_ratio']:>10.3f}{1e3 * r['step_s']:>9.1f}")
  return "\n".join(lines)


def format_table(model: str, result: dict[str, Any]) -> str:
  lines = [f"\n{model}: FLOPs and wall time per training step vs SGD",
           f"{'method':<28}{'FLOPs/SGD':>10}{'FLOPs/grad':>11}"
           f"{'time/SGD':>10}{'ms/step':>9}{'compiles':>9}"]
  for name, r in result["methods"].items():
    lines.append(f"{name:<28}{r['flops_ratio']:>10.3f}"
                 f"{r['flops_per_sgd_grad']:>11.3f}{r['time_ratio']:>10.3f}"
                 f"{1e3 * r['step_s']:>9.2f}{r['compilations']:>9d}")
  return "\n".join(lines)


# ---------------------------------------------------------------- SL-SAM


def slsam_methods(fractions: tuple[float, ...] = (0.5, 0.2)
                  ) -> dict[str, optax.GradientTransformation]:
  """SGD, SAM and SL-SAM (AdamW base) with each executor that applies."""
  base = lambda: optax.adamw(1e-3, weight_decay=0.01)
  out = {"sgd": optax_sam.plain(base()), "sam": optax_sam.sam(base(), 0.05)}
  for f in fractions:
    out[f"slsam[s={f:g},gated]"] = optax_sam.slsam(base(), fraction=f)
  f = fractions[0]
  out[f"slsam[s={f:g},switch]"] = optax_sam.slsam(base(), fraction=f,
                                                  executor="switch")
  out[f"slsam[s={f:g},dense]"] = optax_sam.slsam(base(), fraction=f,
                                                 executor="dense")
  # (slsam(fraction=1) runs dense by default; the gated executor is forced
  # here to show what gating costs with nothing to skip.)
  out["slsam[s=1,gated]"] = optax_sam.slsam(
      base(), fraction=1.0, executor=optax_sam.executors.gated())
  return out


def gated_pass_flops(problem: Problem, fraction: float, draws: int = 20,
                     seed: int = 0) -> dict[str, float]:
  """Compiled FLOPs of one gated gradient pass for sampled selections.

  XLA's cost analysis counts a conditional as its costliest branch, so the
  compiled gated step reports full FLOPs whatever it skips. Here each draw
  (every leaf independently with probability ``fraction``, as SL-SAM's
  first step) is compiled with its gates known at trace time, which prunes
  exactly the work the run-time conditionals skip; the mean over draws,
  relative to a full gradient, is the expected FLOPs of one pass.
  """
  from optax_sam._src import gating  # pylint: disable=g-import-not-at-top
  full = compiled_cost(jax.grad(problem.loss_fn, has_aux=problem.has_aux),
                       problem.params, *problem.batch)["flops"]
  leaves, treedef = jax.tree.flatten(problem.params)
  sizes = np.array([np.size(x) for x in leaves], float)
  rng = np.random.default_rng(seed)
  ratios, active = [], []
  for _ in range(draws):
    sel = rng.random(len(leaves)) < fraction
    if not sel.any():
      continue
    gates = jax.tree.unflatten(treedef, [bool(v) for v in sel])
    fn = jax.grad(gating.gated(problem.loss_fn, gates),
                  has_aux=problem.has_aux)
    ratios.append(compiled_cost(fn, problem.params, *problem.batch)["flops"]
                  / full)
    active.append(float(sizes[sel].sum() / sizes.sum()))
  return {"fraction": fraction, "draws": len(ratios),
          "pass_flops_ratio_mean": float(np.mean(ratios)),
          "pass_flops_ratio_min": float(np.min(ratios)),
          "pass_flops_ratio_max": float(np.max(ratios)),
          "active_param_ratio_mean": float(np.mean(active))}


def measure_slsam(problem: Problem, *, rounds: int, steps_per_round: int,
                  fractions: tuple[float, ...] = (0.5, 0.2),
                  draws: int = 10) -> dict[str, Any]:
  """SL-SAM's cost next to SGD and SAM: wall time (interleaved), compiled
  FLOPs, compilations, FLOPs of a gated pass, active parameters."""
  out = measure(problem, slsam_methods(fractions), rounds=rounds,
                steps_per_round=steps_per_round)
  out["gated_pass"] = {f"{f:g}": gated_pass_flops(problem, f, draws)
                       for f in fractions}
  return out


def format_slsam_table(model: str, result: dict[str, Any]) -> str:
  lines = [f"== {model}: SL-SAM cost (AdamW base) ==",
           f"{'program':<24}{'time/SGD':>9}{'FLOPs/SGD':>10}{'compiles':>9}"]
  for name, row in result["methods"].items():
    lines.append(f"{name:<24}{row['time_ratio']:>9.2f}"
                 f"{row['flops_ratio']:>10.2f}{row['compilations']:>9d}")
  for f, g in result["gated_pass"].items():
    lines.append(f"gated pass, s={f}: FLOPs {g['pass_flops_ratio_mean']:.2f} "
                 f"of a full gradient (range {g['pass_flops_ratio_min']:.2f}-"
                 f"{g['pass_flops_ratio_max']:.2f}, {g['draws']} draws), "
                 f"active params {g['active_param_ratio_mean']:.2f}")
  lines.append("(compiled FLOPs of a step with a conditional count its "
               "costliest branch: the gated rows show full FLOPs; the gated "
               "pass lines give what the taken branches compute)")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--batch", type=int, default=None,
                      help="batch size (default: each model's)")
  parser.add_argument("--steps-per-round", type=int, default=10)
  parser.add_argument("--name", default=None,
                      help="results name (default: core_cost, or "
                      "executor_cost with --executors)")
  parser.add_argument("--no-write", action="store_true")
  parser.add_argument(
      "--executors", action="store_true",
      help="the executor table: switch/dense/specialize against the static "
      "program, layer-wise SAM and ARSAM branches, SAM by hand, for each "
      "backward rule of the convolutions")
  parser.add_argument("--conv-backward", default="xla,forward,auto",
                      help="backward rules to compare (--executors)")
  parser.add_argument("--image", default="28,28,1",
                      help="image shape of the conv models (--executors)")
  parser.add_argument(
      "--selections-from", default="benchmarks/results/full.json",
      help="results file whose CNN layer-wise selections and ARSAM "
      "recompute fraction weight the amortized rows (--executors)")
  parser.add_argument("--resnet-width", type=int, default=None,
                      help="ResNet-18 width (default 64; 16 with "
                      "--executors)")
  parser.add_argument("--mlp-depth", type=int, default=8)
  parser.add_argument("--mlp-width", type=int, default=256)
  parser.add_argument("--progress", action="store_true")
  parser.add_argument(
      "--slsam", action="store_true",
      help="SL-SAM's cost: SGD, SAM and SL-SAM with the gated, switch and "
      "dense executors (AdamW base), and the FLOPs of a gated pass")
  parser.add_argument(
      "--methods", default=None,
      help="comma-separated names of benchmarks.methods to measure against "
      "sgd instead of the core set (e.g. sam,gsam,msam); a method that "
      "cannot run on a model is listed under 'skipped' with the reason")
  parser.add_argument("--only", default=None,
                      help="comma-separated program kinds to measure with "
                      "--executors (e.g. sam,sam_handwritten; sgd always)")
  args = parser.parse_args(argv)
  provenance.record_start()
  results = {}
  for model in args.models.split(","):
    kwargs = {"batch": args.batch} if args.batch else {}
    if args.executors and model in ("cnn", "resnet18"):
      kwargs["image"] = tuple(int(v) for v in args.image.split(","))
    if model == "resnet18" and (args.resnet_width or args.executors):
      kwargs["width"] = args.resnet_width or 16
    if model == "mlp":
      kwargs.update(depth=args.mlp_depth, width=args.mlp_width)
    problem = PROBLEMS[model](**kwargs)
    if args.slsam:
      results[model] = measure_slsam(problem, rounds=args.rounds,
                                     steps_per_round=args.steps_per_round)
      print(format_slsam_table(model, results[model]), flush=True)
      continue
    if args.methods:
      methods, skipped = registered_methods(problem, args.methods.split(","))
      results[model] = measure(problem, methods, rounds=args.rounds,
                               steps_per_round=args.steps_per_round)
      results[model]["skipped"] = skipped
      print(format_table(model, results[model]), flush=True)
      for name, why in skipped.items():
        print(f"  {name}: not run on {model}: {why}", flush=True)
      continue
    if not args.executors:
      results[model] = measure(problem, core_methods(problem),
                               rounds=args.rounds,
                               steps_per_round=args.steps_per_round)
      print(format_table(model, results[model]), flush=True)
      continue
    selections, fraction = {}, None
    if model == "cnn" and args.selections_from:
      selections, fraction = selections_from_results(
          args.selections_from, "fashion_mnist", "layerwise_sam")
    if not selections:
      selections = default_selections(problem.groups)
    problems = ({mode: PROBLEMS[model](**kwargs, conv_backward=mode)
                 for mode in args.conv_backward.split(",")}
                if model in ("cnn", "resnet18") else {"auto": problem})
    results[model] = measure_executors(
        problems, selections=selections, recompute_fraction=fraction,
        suffix_start=problem.groups.num_groups // 2, rounds=args.rounds,
        steps_per_round=args.steps_per_round, progress=args.progress,
        only=tuple(args.only.split(",")) if args.only else None)
    print(format_executor_table(model, results[model]), flush=True)
  if not args.no_write:
    name = args.name or ("executor_cost" if args.executors else
                         "slsam_cost" if args.slsam else "core_cost")
    path = provenance.write_result(
        name, {"settings": vars(args), "results": results}, seeds=[0])
    print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
