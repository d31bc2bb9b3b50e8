"""Tables and plots from ``benchmarks/results/*.json`` (never typed by hand).

``python -m benchmarks.report`` writes ``benchmarks/results/REPORT.md``, a
PNG per benefit result (accuracy vs training wall time, FLOPs ratio bars),
and replaces the block between ``<!-- results:start -->`` and
``<!-- results:end -->`` in README.md with the generated tables.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _fmt(x, spec=".3f", none="-"):
  return none if x is None else format(x, spec)


def _provenance_line(prov: dict[str, Any]) -> str:
  d = prov.get("device", {})
  v = prov.get("versions", {})
  commit = str(prov.get("git_commit"))
  commit = commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")
  return (f"_{prov.get('date', '?')}, commit `{commit}`"
          f", {d.get('platform', '?')} ({d.get('kind', '?')}, "
          f"{d.get('cpu_count', '?')} CPU cores), jax {v.get('jax')}, "
          f"seeds {prov.get('seeds')}; command: `{prov.get('command')}`_")


def benefit_tables(name: str, res: dict[str, Any]) -> list[str]:
  out = [f"### `{name}.json` (preset `{res.get('preset')}`)", "",
         _provenance_line(res["provenance"]), ""]
  if "cost_provenance" in res:
    out += ["Cost columns re-measured from the recorded runs (`--recost`): "
            + _provenance_line(res["cost_provenance"]), ""]
  for task, r in res["results"].items():
    t = r["task"]
    out += [f"**{task}**: {t.get('epochs')} epochs, batch {t.get('batch')}, "
            f"SGD momentum 0.9, lr {t.get('lr')} cosine, weight decay "
            f"{t.get('weight_decay')}; mean ± std over seeds.", "",
            "| method | FLOPs/SGD | step time/SGD | test acc | Δ acc vs SGD "
            "(paired) | train time/SGD | acc at SGD's time | grad norm | "
            "top Hessian eig |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m, s in r["summary"].items():
      c = r["cost"].get(m, {})
      out.append(
          f"| {m} | {_fmt(c.get('flops_ratio'), '.2f')} | "
          f"{_fmt(c.get('time_ratio'), '.2f')} | "
          f"{_fmt(s['test_acc'], '.4f')} ± {_fmt(s['test_acc_std'], '.4f')} | "
          f"{_fmt(s.get('acc_minus_sgd'), '+.4f')} ± "
          f"{_fmt(s.get('acc_minus_sgd_std'), '.4f')} | "
          f"{_fmt(s.get('train_time_ratio'), '.2f')} | "
          f"{_fmt(s.get('acc_at_sgd_budget'), '.4f')} | "
          f"{_fmt(s['grad_norm'], '.3f')} | "
          f"{_fmt(s['hessian_top_eig'], '.2f')} |")
    out.append("")
    out += _program_lines(r["cost"], list(r["summary"]))
  return out


def _program_lines(cost: dict[str, Any], methods: list[str]) -> list[str]:
  """One line per method that ran several static programs: each program's
  share of the steps and its FLOPs and time ratios to SGD."""
  lines = []
  for m in methods:
    c = cost.get(m, {})
    if not c.get("fractions"):
      continue
    parts = []
    for b, f in c["fractions"].items():
      row = cost.get(f"{m}[{b}]", {})
      parts.append(f"{b} {100 * f:.0f}% ({_fmt(row.get('flops_ratio'), '.2f')}"
                   f"x FLOPs, {_fmt(row.get('time_ratio'), '.2f')}x time)")
    lines.append(f"- {m}, amortized over its programs: " + "; ".join(parts))
  return lines + [""] if lines else []


def cost_tables(name: str, res: dict[str, Any]) -> list[str]:
  out = [f"### `{name}.json`", "", _provenance_line(res["provenance"]), ""]
  for model, r in res["results"].items():
    out += [f"**{model}** ({r.get('param_count', '?')} parameters)", "",
            "| method | FLOPs/SGD step | FLOPs/SGD gradient | wall time/SGD "
            "| ms/step | compilations |", "|---|---|---|---|---|---|"]
    for m, row in r["methods"].items():
      out.append(f"| {m} | {row['flops_ratio']:.3f} | "
                 f"{row['flops_per_sgd_grad']:.3f} | {row['time_ratio']:.3f} "
                 f"| {1e3 * row['step_s']:.1f} | {row['compilations']} |")
    out.append("")
    if r.get("gated_pass"):  # benchmarks.cost --slsam
      out += ["Compiled FLOPs of a step with a conditional count its "
              "costliest branch, so the gated rows above show full FLOPs. "
              "What one gated pass computes, each draw compiled with its "
              "gates known (every leaf drawn with probability s):", "",
              "| s | draws | FLOPs / full gradient (mean, min-max) "
              "| active parameters |", "|---|---|---|---|"]
      for f, g in r["gated_pass"].items():
        out.append(f"| {f} | {g['draws']} | {g['pass_flops_ratio_mean']:.2f}"
                   f" ({g['pass_flops_ratio_min']:.2f}-"
                   f"{g['pass_flops_ratio_max']:.2f}) | "
                   f"{g['active_param_ratio_mean']:.2f} |")
      out.append("")
  return out


def executor_tables(name: str, res: dict[str, Any]) -> list[str]:
  """``benchmarks.cost --executors``: every program per backward rule."""
  out = [f"### `{name}.json`", "", _provenance_line(res["provenance"]), "",
         "Per step, as ratios to the SGD step built with the same backward "
         "rule for the convolutions (`xla`: XLA's own; `forward`: the "
         "forward form in every pass; `auto`, the default: the forward form "
         "in the passes inside a method's conditional branches, XLA's rule "
         "elsewhere; models without convolutions have `auto` only). FLOPs "
         "marked * are those of a program with a conditional, which XLA's "
         "cost analysis counts as its costliest branch; the static and "
         "specialize rows give the taken branch's. Amortized rows weight "
         "each held selection or branch by its share of the steps of the "
         "recorded training runs.", ""]
  for model, r in res["results"].items():
    out += [f"**{model}**", "",
            "| program | FLOPs/SGD | wall time/SGD | ms/step |",
            "|---|---|---|---|"]
    for m, row in r["methods"].items():
      fl = row.get("flops_ratio")
      flops = "-" if fl is None else (f"{fl:.3f}" + (
          "*" if row.get("conditional") else ""))
      tag = " (amortized: " + ", ".join(
          f"{k} {v:.0%}" for k, v in row["fractions"].items()) + ")" if (
              row.get("amortized")) else ""
      out.append(f"| {m}{tag} | {flops} | {row['time_ratio']:.3f} | "
                 f"{1e3 * row['step_s']:.1f} |")
    out.append("")
  return out


def selection_tables(name: str, res: dict[str, Any]) -> list[str]:
  out = [f"### `{name}.json`", "", _provenance_line(res["provenance"]), ""]
  for model, r in res["results"].items():
    f, w = r["flops"], r["wall"]
    out += [f"**{model}**: top-{r['k']} of {len(r['groups'])} layer groups, "
            f"re-selected every {r['every']} steps, {r['steps']} steps; "
            f"selections: {', '.join(r['selections'])}", "",
            "| executor | amortized FLOPs/SGD | FLOPs/static | "
            "wall/SGD | wall/static | median wall/static | steps timed |",
            "|---|---|---|---|---|---|---|"]
    for m in ("static", "switch", "specialize"):
      fl = f["amortized_ratio_to_sgd"][m]
      out.append(f"| {m} | {fl:.3f} | "
                 f"{fl / f['amortized_ratio_to_sgd']['static']:.3f} | "
                 f"{w['mean_ratio_to_sgd'][m]:.3f} | "
                 f"{w['mean_ratio_to_static'][m]:.3f} | "
                 f"{w['median_s'][m] / w['median_s']['static']:.3f} | "
                 f"{w['steps_timed'][m]} |")
    c = r["compile"]
    out += ["", f"switch: {c['switch_num_branches']} branches compiled once in "
            f"{c['switch_compile_s']:.1f} s; specialize: "
            f"{c['specialize_compilations']} programs.", ""]
  return out


def _pm(s: dict[str, Any], key: str, spec: str) -> str:
  """``mean ± std`` of a summary column (``-`` when absent)."""
  if s.get(key) is None:
    return "-"
  std = s.get(key + "_std")
  return _fmt(s[key], spec) + ("" if std is None else
                               " ± " + _fmt(std, spec.lstrip("+")))


def _kib(s: dict[str, Any], key: str) -> str:
  return "-" if s.get(key) is None else f"{s[key] / 1024:.1f}"


_COST_HEADER = ("ms/step | train time/AdamW | clean active | perturbed active "
                "| active/SGD | temp KiB | arguments KiB | outputs KiB | "
                "opt. state KiB")
_COST_COLUMNS = ("*ms/step*: the timed steps' wall time per step (steps "
                 "that compiled a program are timed apart); *clean / "
                 "perturbed active*: mean over the steps of the fraction of "
                 "parameters whose gradient the clean pass and the pass at "
                 "w + eps computed, from `SharpnessAwareState` "
                 "(AdamW alone: 1 and 0); *active/SGD*: their sum, relative "
                 "to SGD's one full backward; *temp / arguments / outputs*: "
                 "the compiled step's `memory_analysis()` (host-driven "
                 "methods: the program with the largest temporary buffer); "
                 "*opt. state*: bytes of the optimizer state's leaves.")


def _cost_cells(s: dict[str, Any]) -> str:
  return (f"{_pm(s, 'step_time_ms', '.2f')} | "
          f"{_fmt(s.get('train_time_ratio'), '.2f')} | "
          f"{_fmt(s.get('clean_active'), '.3f')} | "
          f"{_fmt(s.get('perturbed_active'), '.3f')} | "
          f"{_pm(s, 'active_ratio', '.3f')} | "
          f"{_kib(s, 'memory_temp_size_in_bytes')} | "
          f"{_kib(s, 'memory_argument_size_in_bytes')} | "
          f"{_kib(s, 'memory_output_size_in_bytes')} | "
          f"{_kib(s, 'state_bytes')}")


def _defaults_line(res: dict[str, Any]) -> list[str]:
  d = res.get("method_defaults") or {}
  if not d:
    return []
  return ["Methods by their library defaults: " + "; ".join(
      f"`{m}` (" + ", ".join(f"{k}={v}" for k, v in kw.items()
                             if v is not None) + ")"
      for m, kw in d.items()) + ".", ""]


def lm_tables(name: str, res: dict[str, Any]) -> list[str]:
  st, pre = res["settings"], res["pretrain"]
  out = [f"### `{name}.json`", "", _provenance_line(res["provenance"]), "",
         f"Character-level Transformer LM (d_model {st['d_model']}, "
         f"{st['layers']} layers, context {st['seq_len']}, batch "
         f"{st['batch']}): pre-trained {pre['steps']} steps with AdamW on the "
         f"non-comedies (validation loss {pre['val_loss_pretrain_corpus']:.3f}"
         f"; {pre['val_loss_finetune_corpus']:.3f} on the comedies), then "
         f"fine-tuned {st['finetune_steps']} steps on the comedies by each "
         "method with AdamW (lr "
         f"{st['finetune_lr']} cosine); validation on held-out comedy text, "
         "mean ± std over seeds; \"sgd\" is AdamW alone.", ""]
  if not any("forgetting" in s for s in res["summary"].values()):
    out += ["| method | val loss (nats/char) | Δ vs AdamW (paired) | "
            "perplexity | train time/AdamW |", "|---|---|---|---|---|"]
    for m, s in res["summary"].items():
      out.append(f"| {m} | {_pm(s, 'val_loss', '.4f')} | "
                 f"{_pm(s, 'val_loss_minus_base', '+.4f')} | "
                 f"{s['perplexity']:.3f} | "
                 f"{_fmt(s.get('train_time_ratio'), '.2f')} |")
    return out + [""]
  out += _defaults_line(res)
  out += ["*Forgetting*: validation loss on the pre-training plays after "
          "fine-tuning minus the pre-trained model's "
          f"({pre['val_loss_pretrain_corpus']:.4f}); Δ columns are paired "
          "differences to AdamW on the same seed.", "",
          "| method | val loss (nats/char) | Δ vs AdamW | perplexity | "
          "forgetting | Δ forgetting vs AdamW |",
          "|---|---|---|---|---|---|"]
  for m, s in res["summary"].items():
    out.append(f"| {m} | {_pm(s, 'val_loss', '.4f')} | "
               f"{_pm(s, 'val_loss_minus_base', '+.4f')} | "
               f"{_fmt(s.get('perplexity'), '.3f')} | "
               f"{_pm(s, 'forgetting', '+.4f')} | "
               f"{_pm(s, 'forgetting_minus_base', '+.4f')} |")
  return out + [""] + _cost_table(res)


def _cost_table(res: dict[str, Any]) -> list[str]:
  out = ["| method | " + _COST_HEADER + " |", "|---" * 10 + "|"]
  for m, s in res["summary"].items():
    out.append(f"| {m} | {_cost_cells(s)} |")
  wall = res.get("wall_time_s")
  load = [r["load_avg_1m"] for r in res["runs"] if "load_avg_1m" in r]
  return out + ["", _COST_COLUMNS, ""] + (
      [f"Recorded in {wall:.0f} s of wall time (pre-training included)" + (
          f"; the host's 1-minute load average at the end of the runs: "
          f"{min(load):.1f} to {max(load):.1f} on "
          f"{res['provenance']['device'].get('cpu_count')} cores (this "
          "process alone keeps it near the core count; more means other "
          "processes competed for the CPU during the timed steps)" if load
          else "") + ".", ""]
      if wall is not None else [])


def finetune_vision_tables(name: str, res: dict[str, Any]) -> list[str]:
  """``benchmarks.finetune``: Fashion-MNIST classes 0-4, then 5-9."""
  st, t, pre = res["settings"], res["task"], res["pretrain"]
  model = (f"MLP (hidden {st['hidden']})" if st["model"] == "mlp" else
           f"SmallCNN (width {st['width']})")
  out = [f"### `{name}.json`", "", _provenance_line(res["provenance"]), "",
         f"Fashion-MNIST, {model}, {t['param_count']} parameters: "
         f"pre-trained {pre['steps']} steps with AdamW (lr {st['lr']} "
         f"cosine) on classes 0-4 ({t['pretrain_examples']} images; test "
         f"accuracy {pre['old_test_acc']:.4f}), then fine-tuned "
         f"{t['finetune_steps']} steps ({st['finetune_epochs']} epochs of "
         f"{t['finetune_examples']} images of classes 5-9, batch "
         f"{st['batch']}, AdamW lr {st['finetune_lr']} cosine) by each "
         f"method. The 5-way head (`{pre['head']}`) is re-initialised for "
         "fine-tuning; the pre-trained head is kept aside, and *old acc* is "
         "the fine-tuned body with it on the test images of classes 0-4 "
         "(*forgetting* = accuracy before minus after). Test figures on "
         f"{t['test_examples'][1]} images of classes 5-9; mean ± std over "
         "seeds; Δ columns are paired differences to AdamW (\"sgd\") on the "
         "same seed.", ""]
  out += _defaults_line(res)
  out += ["| method | test acc | Δ acc vs AdamW | test NLL | Δ NLL vs AdamW "
          "| old acc after | forgetting | Δ forgetting vs AdamW |",
          "|---|---|---|---|---|---|---|---|"]
  for m, s in res["summary"].items():
    out.append(f"| {m} | {_pm(s, 'test_acc', '.4f')} | "
               f"{_pm(s, 'test_acc_minus_base', '+.4f')} | "
               f"{_pm(s, 'test_nll', '.4f')} | "
               f"{_pm(s, 'test_nll_minus_base', '+.4f')} | "
               f"{_pm(s, 'old_acc_after', '.4f')} | "
               f"{_pm(s, 'forgetting', '.4f')} | "
               f"{_pm(s, 'forgetting_minus_base', '+.4f')} |")
  return out + [""] + _cost_table(res)


def plot_benefit(name: str, res: dict[str, Any]) -> list[str]:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  paths = []
  for task, r in res["results"].items():
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m in r["summary"]:
      runs = [x for x in r["runs"] if x["method"] == m]
      epochs = len(runs[0]["history"])
      t = [sum(x["history"][e]["train_time_s"] for x in runs) / len(runs)
           for e in range(epochs)]
      a = [sum(x["history"][e]["test_acc"] for x in runs) / len(runs)
           for e in range(epochs)]
      ax1.plot(t, a, marker="o", label=m)
    ax1.set_xlabel("training wall time (s, mean over seeds)")
    ax1.set_ylabel("test accuracy")
    ax1.set_title(task)
    ax1.legend(fontsize=8)
    names = [m for m in r["summary"] if m in r["cost"]]
    ax2.bar(names, [r["cost"][m].get("flops_ratio", 0) for m in names])
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel("compiled FLOPs per step / SGD")
    ax2.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    path = os.path.join(RESULTS, f"{name}_{task}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths.append(path)
  return paths


def build(results_dir: str = RESULTS) -> tuple[str, list[str]]:
  md, images = ["## Results (generated by `python -m benchmarks.report`)", ""], []
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
      res = json.load(f)
    if res.get("preset") == "tiny":
      continue  # proves the harness; never quoted
    if "preset" in res:
      md += benefit_tables(name, res)
      for p in plot_benefit(name, res):
        rel = os.path.relpath(p, os.path.dirname(README))
        md += [f"![{name}]({rel})", ""]
        images.append(p)
    elif res.get("kind") == "finetune_vision":
      md += finetune_vision_tables(name, res)
    elif "pretrain" in res:
      md += lm_tables(name, res)
    elif name.startswith("selection"):
      md += selection_tables(name, res)
    elif name.startswith("executor_cost"):
      md += executor_tables(name, res)
    elif "results" in res and all("methods" in r
                                  for r in res["results"].values()):
      md += cost_tables(name, res)
  return "\n".join(md), images


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--no-readme", action="store_true")
  args = parser.parse_args(argv)
  text, images = build()
  with open(os.path.join(RESULTS, "REPORT.md"), "w") as f:
    # REPORT.md sits beside the images; README links them from the top.
    f.write(text.replace("](benchmarks/results/", "](") + "\n")
  if not args.no_readme and os.path.exists(README):
    with open(README) as f:
      readme = f.read()
    if START in readme and END in readme:
      head, rest = readme.split(START, 1)
      _, tail = rest.split(END, 1)
      with open(README, "w") as f:
        f.write(head + START + "\n" + text + "\n" + END + tail)
  print(text)
  print(f"\nwrote {os.path.join(RESULTS, 'REPORT.md')} and {len(images)} "
        "plot(s)")


if __name__ == "__main__":
  main()
