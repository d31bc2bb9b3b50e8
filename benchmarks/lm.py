"""Character-level Shakespeare LM: pre-train once, fine-tune with each method.

The pre-train corpus is every play except the comedies; the fine-tune corpus
is the comedies (``benchmarks/data.py``, split by play). One base model is
pre-trained with AdamW (seed 0) and kept in memory as the checkpoint; every
method then fine-tunes a copy of it with the same AdamW schedule, data order
(by seed) and number of steps. Recorded: validation loss (nats/char) and
perplexity on the comedies' held-out text, training wall time, and the
whole-model gradient norm at the end.

``python -m benchmarks.lm --methods sgd,sam,layerwise_sam --seeds 0,1,2``
("sgd" here is the base optimizer alone, i.e. AdamW).
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
from benchmarks import data as data_lib
from benchmarks import methods as methods_lib
from benchmarks import provenance
from benchmarks import train as train_lib


def _model(vocab: int, d_model: int, num_layers: int, seq_len: int):
  from optax_sam.models import CharTransformerLM  # pylint: disable=g-import-not-at-top
  return CharTransformerLM(vocab_size=vocab, d_model=d_model,
                           num_layers=num_layers, num_heads=4,
                           max_len=seq_len)


def _loss(model):
  from optax_sam.models import lm_loss  # pylint: disable=g-import-not-at-top
  return lm_loss(model, train=False)


def evaluate(loss_fn, params, ids: np.ndarray, seq_len: int,
             batch: int = 64, windows: int = 512) -> float:
  """Mean next-token loss over fixed, evenly spaced validation windows."""
  starts = np.linspace(0, len(ids) - seq_len - 2, windows).astype(int)
  f = jax.jit(loss_fn)
  total = 0.0
  for i in range(0, windows, batch):
    w = np.stack([ids[s:s + seq_len + 1] for s in starts[i:i + batch]])
    total += float(f(params, jnp.asarray(w))) * len(w)
  return total / windows


def fit(tx_method: methods_lib.Method, loss_fn, params, ids, *, steps: int,
        seq_len: int, batch: int, seed: int) -> tuple[Any, float, Any]:
  tx = tx_method.tx
  state = tx.init(params)
  if tx_method.specialized:
    driver = optax_sam.SpecializedStep(tx, loss_fn)
    apply = jax.jit(optax.apply_updates)

    def step(p, s, tok):
      _, u, s = driver(p, s, tok)
      return apply(p, u), s
  else:
    update = optax_sam.make_update(tx, loss_fn)

    @jax.jit
    def step(p, s, tok):
      _, u, s = update(p, s, tok)
      return optax.apply_updates(p, u), s

  windows = data_lib.prefetch(data_lib.token_windows(ids, seq_len, batch,
                                                     seed, steps))
  first = True
  t0 = time.perf_counter()
  for tok in windows:
    params, state = step(params, state, jnp.asarray(tok))
    if first:  # compilation apart
      jax.block_until_ready(params)
      t0, first = time.perf_counter(), False
  jax.block_until_ready(params)
  return params, time.perf_counter() - t0, state


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default="sgd,sam,layerwise_sam,arsam")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--pretrain-steps", type=int, default=1000)
  parser.add_argument("--finetune-steps", type=int, default=300)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--d-model", type=int, default=64)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--finetune-lr", type=float, default=1e-3)
  parser.add_argument("--hparams", default="")
  parser.add_argument("--name", default="shakespeare_lm")
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args(argv)
  provenance.record_start()
  pre, fine = data_lib.shakespeare_corpora()
  model = _model(len(pre.vocab), args.d_model, args.layers, args.seq_len)
  loss_fn = _loss(model)
  params = model.init(jax.random.PRNGKey(0),
                      jnp.zeros((1, args.seq_len), jnp.int32))["params"]
  groups = optax_sam.layer_groups(params)

  def adamw(lr, steps):
    return optax.adamw(optax.cosine_decay_schedule(lr, steps),
                       weight_decay=0.01)

  base = methods_lib.build("sgd", adamw(args.lr, args.pretrain_steps))
  pre_params, pre_time, _ = fit(base, loss_fn, params, pre.train,
                                steps=args.pretrain_steps,
                                seq_len=args.seq_len, batch=args.batch,
                                seed=0)
  pretrain = {"steps": args.pretrain_steps, "train_time_s": pre_time,
              "val_loss_pretrain_corpus": evaluate(loss_fn, pre_params,
                                                   pre.valid, args.seq_len),
              "val_loss_finetune_corpus": evaluate(loss_fn, pre_params,
                                                   fine.valid, args.seq_len)}
  print(f"pre-trained {args.pretrain_steps} steps in {pre_time:.0f}s: val "
        f"loss {pretrain['val_loss_pretrain_corpus']:.3f} (pre-train plays),"
        f" {pretrain['val_loss_finetune_corpus']:.3f} (comedies)", flush=True)

  hparams = methods_lib.parse_hparams(args.hparams)
  runs = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    for name in args.methods.split(","):
      m = methods_lib.build(name, adamw(args.finetune_lr, args.finetune_steps),
                            **hparams.get(name, {}))
      p, secs, state = fit(m, loss_fn, pre_params, fine.train,
                           steps=args.finetune_steps, seq_len=args.seq_len,
                           batch=args.batch, seed=seed + 1)
      val = evaluate(loss_fn, p, fine.valid, args.seq_len)
      probe = jnp.asarray(np.stack(list(data_lib.token_windows(
          fine.train, args.seq_len, 256, 999, 1))[0]))
      rec = {"method": name, "seed": seed, "hparams": m.hparams,
             "val_loss": val, "perplexity": float(np.exp(val)),
             "train_time_s": secs,
             "grad_norm": train_lib.tree_norm(jax.jit(jax.grad(loss_fn))(
                 p, probe))}
      if hasattr(state, "recomputes"):
        rec["recompute_fraction"] = float(state.recomputes) / max(
            int(state.count), 1)
      runs.append(rec)
      print(f"  seed {seed} {name:<14} val loss {val:.4f} (ppl "
            f"{np.exp(val):.3f}) {secs:.0f}s", flush=True)

  summary = {}
  for name in args.methods.split(","):
    rs = [r for r in runs if r["method"] == name]
    base_rs = {r["seed"]: r for r in runs if r["method"] == "sgd"}
    v = [r["val_loss"] for r in rs]
    row = {"val_loss": float(np.mean(v)),
           "val_loss_std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
           "perplexity": float(np.mean([r["perplexity"] for r in rs])),
           "train_time_s": float(np.mean([r["train_time_s"] for r in rs]))}
    if base_rs:
      d = [r["val_loss"] - base_rs[r["seed"]]["val_loss"] for r in rs]
      row["val_loss_minus_base"] = float(np.mean(d))
      row["val_loss_minus_base_std"] = (float(np.std(d, ddof=1))
                                        if len(d) > 1 else 0.0)
      row["train_time_ratio"] = float(np.mean(
          [r["train_time_s"] / base_rs[r["seed"]]["train_time_s"]
           for r in rs]))
    summary[name] = row
  print(f"\n{'method':<15}{'val loss':>18}{'Δ vs base':>18}{'ppl':>8}"
        f"{'time/base':>10}")
  for name, s in summary.items():
    print(f"{name:<15}{s['val_loss']:>10.4f}±{s['val_loss_std']:.4f}"
          f"{s.get('val_loss_minus_base', 0):>+11.4f}±"
          f"{s.get('val_loss_minus_base_std', 0):.4f}{s['perplexity']:>8.3f}"
          f"{s.get('train_time_ratio', 1):>10.2f}")
  result = {"settings": vars(args), "groups": groups.describe(),
            "pretrain": pretrain, "summary": summary, "runs": runs}
  if not args.no_write:
    path = provenance.write_result(args.name, result,
                                   seeds=[int(x) for x in args.seeds.split(",")])
    print(f"\nwrote {path}")
  return result


if __name__ == "__main__":
  main()
