"""Character-level Shakespeare LM: pre-train once, fine-tune with each method.

The pre-train corpus is every play except the comedies; the fine-tune corpus
is the comedies (``benchmarks/data.py``, split by play). One base model is
pre-trained with AdamW (seed 0) and kept in memory as the checkpoint; every
method then fine-tunes a copy of it with the same AdamW schedule, data order
(by seed) and number of steps (the loop of ``benchmarks/finetune.py``).
Recorded per run: validation loss (nats/char) and perplexity on the
comedies' held-out text; forgetting: the loss on the pre-training plays'
held-out text after fine-tuning, minus the pre-trained model's (measured
once); the whole-model gradient norm at the end; and the cost figures of
``benchmarks.finetune.cost_figures`` (wall time and time per step, the
active-parameter ratio read from ``SharpnessAwareState``, the compiled
step's memory analysis, the optimizer state's bytes).

``python -m benchmarks.lm --methods sgd,sam,layerwise_sam --seeds 0,1,2``
("sgd" here is the base optimizer alone, i.e. AdamW). ``--finetune-plays
twelfth_night --finetune-chars 20000`` fine-tunes on a slice of one comedy
instead (validated on its held-out end), and ``--eval-every K`` records the
validation curve.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optax_sam
from benchmarks import data as data_lib
from benchmarks import finetune as ft
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
  parser.add_argument(
      "--finetune-plays", default="",
      help="comma-separated plays to fine-tune on (default: every comedy "
      "of data.FINETUNE_PLAYS); validation is their held-out 10%%")
  parser.add_argument(
      "--finetune-chars", type=int, default=0,
      help="keep only the first N characters of the fine-tuning training "
      "text (0: all): a set AdamW passes over many times, where SAM's "
      "gain shows (docs/results.md)")
  parser.add_argument(
      "--eval-every", type=int, default=0,
      help="also evaluate the validation loss every K fine-tuning steps "
      "(records the curve and its minimum, what early stopping reaches)")
  parser.add_argument("--hparams", default="")
  parser.add_argument("--name", default="shakespeare_lm")
  parser.add_argument("--results-dir", default=None)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args(argv)
  provenance.record_start()
  plan = ft.runs_plan(args.methods, args.seeds)
  progress = ft.Progress(len(plan) + 1)
  pre, fine = data_lib.shakespeare_corpora(
      finetune_plays=[p for p in args.finetune_plays.split(",") if p] or None)
  if args.finetune_chars:
    fine.train = fine.train[:args.finetune_chars]
  model = _model(len(pre.vocab), args.d_model, args.layers, args.seq_len)
  loss_fn = _loss(model)
  params = model.init(jax.random.PRNGKey(0),
                      jnp.zeros((1, args.seq_len), jnp.int32))["params"]
  groups = optax_sam.layer_groups(params)

  def windows(ids, seed, steps):
    return ((w,) for w in data_lib.token_windows(ids, args.seq_len,
                                                  args.batch, seed, steps))

  progress.start(f"pre-train {args.pretrain_steps} steps")
  base = methods_lib.build("sgd", ft.adamw(args.lr, args.pretrain_steps))
  pre_fit = ft.fit(base, loss_fn, params, windows(pre.train, 0,
                                                  args.pretrain_steps))
  pre_params = pre_fit.params
  pretrain = {"steps": args.pretrain_steps,
              "train_time_s": pre_fit.train_time_s,
              "val_loss_pretrain_corpus": evaluate(loss_fn, pre_params,
                                                   pre.valid, args.seq_len),
              "val_loss_finetune_corpus": evaluate(loss_fn, pre_params,
                                                   fine.valid, args.seq_len)}
  before = pretrain["val_loss_pretrain_corpus"]
  print(f"  pre-trained {args.pretrain_steps} steps in "
        f"{pre_fit.train_time_s:.0f}s: val loss {before:.3f} (pre-train "
        f"plays), {pretrain['val_loss_finetune_corpus']:.3f} (comedies)",
        flush=True)

  hparams = methods_lib.parse_hparams(args.hparams)
  probe = jnp.asarray(next(data_lib.token_windows(fine.train, args.seq_len,
                                                  256, 999, 1)))
  grad_fn = jax.jit(jax.grad(loss_fn))
  runs = []
  for seed, name in plan:
    progress.start(f"seed {seed} {name}")
    m = ft.build_method(name, ft.adamw(args.finetune_lr, args.finetune_steps),
                        seed, hparams.get(name),
                        total_steps=args.finetune_steps)
    curve = []
    r = ft.fit(m, loss_fn, pre_params, windows(fine.train, seed + 1,
                                               args.finetune_steps),
               every=args.eval_every,
               on_eval=lambda k, p: curve.append(
                   (k, evaluate(loss_fn, p, fine.valid, args.seq_len))))
    # The last evaluation of the curve is the final one when --eval-every
    # divides the step count; else evaluate the final parameters once here.
    if not curve or curve[-1][0] != r.steps:
      curve.append((r.steps, evaluate(loss_fn, r.params, fine.valid,
                                      args.seq_len)))
    val = curve[-1][1]
    after = evaluate(loss_fn, r.params, pre.valid, args.seq_len)
    rec = {"method": name, "seed": seed, "hparams": m.hparams,
           "val_loss": val, "perplexity": float(np.exp(val)),
           "pretrain_val_loss_before": before,
           "pretrain_val_loss_after": after, "forgetting": after - before,
           "val_curve": curve,
           "best_val_loss": min(v for _, v in curve),
           "best_step": min(curve, key=lambda kv: kv[1])[0],
           **ft.cost_figures(r),
           "grad_norm": train_lib.tree_norm(grad_fn(r.params, probe))}
    if hasattr(r.state, "recomputes"):
      rec["recompute_fraction"] = float(r.state.recomputes) / max(
          int(r.state.count), 1)
    runs.append(rec)
    print(f"  val loss {val:.4f} (best {rec['best_val_loss']:.4f} at step "
          f"{rec['best_step']}; ppl {np.exp(val):.3f}), forgetting "
          f"{after - before:+.4f}, active {ft._fmt(rec['active_ratio'])}, "  # pylint: disable=protected-access
          f"{rec['step_time_ms']:.1f} ms/step", flush=True)

  summary = ft.summarize(
      runs, ["val_loss", "best_val_loss", "perplexity",
             "pretrain_val_loss_after",
             "forgetting", "train_time_s", "step_time_ms", "clean_active",
             "perturbed_active", "active_ratio", "recompute_fraction",
             "state_bytes",
             "memory.temp_size_in_bytes", "memory.argument_size_in_bytes",
             "memory.output_size_in_bytes", "grad_norm"],
      paired=["val_loss", "best_val_loss", "forgetting"],
      ratios=["train_time_s"])
  ft.print_table(summary, [("val loss", "val_loss", ".4f"),
                           ("Δ vs base", "val_loss_minus_base", "+.4f"),
                           ("best val", "best_val_loss", ".4f"),
                           ("Δ best", "best_val_loss_minus_base", "+.4f"),
                           ("forgetting", "forgetting", "+.4f"),
                           ("active", "active_ratio", ".3f"),
                           ("ms/step", "step_time_ms", ".1f"),
                           ("time/base", "train_time_ratio", ".2f")])
  print(f"\n{len(plan)} fine-tuning runs in {progress.elapsed():.0f}s")
  result = {"settings": vars(args), "groups": groups.describe(),
            "method_defaults": {n: ft.factory_defaults(n)
                                for n in args.methods.split(",")
                                if ft.factory_defaults(n) is not None},
            "pretrain": pretrain, "summary": summary, "runs": runs,
            "wall_time_s": progress.elapsed()}
  if not args.no_write:
    path = provenance.write_result(
        args.name, result, seeds=[int(x) for x in args.seeds.split(",")],
        results_dir=args.results_dir)
    print(f"\nwrote {path}")
  return result


if __name__ == "__main__":
  main()
