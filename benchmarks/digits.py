"""SGD vs SAM on scikit-learn's digits with symmetric label noise.

A short, runnable example of the two call paths' C2 form
(``optax_sam.make_update``): the same MLP, data, schedule and base optimizer
(SGD with momentum) for every method; only the transformation differs. Prints
test accuracy (mean and std over seeds) and seconds per run.

Run: ``python -m benchmarks.digits [--epochs 60 --seeds 0,1,2 --noise 0.2]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from benchmarks import data


def init_mlp(key, sizes=(64, 128, 128, 10)) -> dict[str, Any]:
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"dense{i}": {"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a),
                        "b": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def logits_fn(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f"dense{i}"]["w"] + params[f"dense{i}"]["b"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(params, x), y).mean()


def make_tx(method: str, lr, rho: float):
  base = optax.sgd(lr, momentum=0.9)
  if method == "sgd":
    return optax_sam.plain(base)
  if method == "sam":
    return optax_sam.sam(base, rho=rho)
  if method == "asam":
    return optax_sam.asam(base, rho=10 * rho)
  raise ValueError(f"unknown method {method!r}")


def run(method: str, seed: int, *, epochs: int, batch: int, noise: float,
        lr: float, rho: float) -> dict[str, float]:
  (xtr, ytr), (xte, yte) = data.load_digits(noise, seed)
  xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
  steps_per_epoch = len(xtr) // batch
  lr_sched = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
  tx = make_tx(method, lr_sched, rho)
  params = init_mlp(jax.random.PRNGKey(seed))
  state = tx.init(params)
  update = optax_sam.make_update(tx, loss_fn)

  @jax.jit
  def train_step(params, state, x, y):
    (loss, _), updates, state = update(params, state, x, y)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed + 1000)
  t0 = time.perf_counter()
  for _ in range(epochs):
    perm = rng.permutation(len(xtr))
    for i in range(steps_per_epoch):
      idx = perm[i * batch:(i + 1) * batch]
      params, state, _ = train_step(params, state, xtr[idx], ytr[idx])
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  acc = float(jnp.mean(jnp.argmax(logits_fn(params, xte), -1) == yte))
  return {"test_acc": acc, "seconds": seconds}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default="sgd,sam")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--noise", type=float, default=0.2)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--rho", type=float, default=0.05)
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  print(f"digits, {args.noise:.0%} label noise, MLP 64-128-128-10, "
        f"SGD(momentum 0.9), {args.epochs} epochs, seeds {seeds}")
  print(f"{'method':<8}{'test acc (mean ± std)':>24}{'s/run':>8}")
  for method in args.methods.split(","):
    runs = [run(method, s, epochs=args.epochs, batch=args.batch,
                noise=args.noise, lr=args.lr, rho=args.rho) for s in seeds]
    accs = np.array([r["test_acc"] for r in runs])
    secs = np.mean([r["seconds"] for r in runs])
    std = accs.std(ddof=1) if len(accs) > 1 else 0.0
    print(f"{method:<8}{accs.mean():>15.4f} ± {std:.4f}{secs:>8.1f}",
          flush=True)


if __name__ == "__main__":
  main()
