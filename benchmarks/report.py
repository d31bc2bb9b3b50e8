"""Tables and plots from ``benchmarks/results/*.json`` (never typed by hand).

``python -m benchmarks.report`` writes ``benchmarks/results/REPORT.md`` and,
next to each ``benchmarks.run`` results file, per task a Pareto chart
(``<file>_<task>_pareto.png``: paired accuracy gain over SGD against wall
time per step relative to SGD) and a curve (accuracy vs training wall time,
FLOPs ratio bars); it replaces the block between ``<!-- results:start -->``
and ``<!-- results:end -->`` in README.md with the same text (``--no-readme``
leaves README alone). ``--results-dir`` reports another folder, e.g. a run
folder of ``benchmarks.run`` (which redraws its own report at the end of
every run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

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
          f"{d.get('cpu_count', '?')} CPU cores"
          + (f", {d['cpu_model']} {d.get('cpu_isa') or ''}".rstrip()
             if d.get("cpu_model") else "")
          + f"), jax {v.get('jax')}, "
          f"seeds {prov.get('seeds')}; command: `{prov.get('command')}`_")


class Column(NamedTuple):
  """A column of the benefit table, shared by the terminal and REPORT.md.

  Attributes:
    header: the column's name in both tables.
    width: its width in the terminal table.
    cell: ``(summary row, cost row, sep) -> text`` (``sep`` joins mean and
      std: ``"±"`` in the terminal, ``" ± "`` in markdown).
    legend: what the column means (printed under each table).
    dash: what ``-`` means in this column.
    key: the summary field the column needs; a column whose field no method
      of a table has is left out (files recorded before the field existed).
    group: the table it belongs to (0: cost and accuracy; 1: peak accuracy,
      NLL and calibration, a second table to keep lines short).
  """
  header: str
  width: int
  cell: Callable[[dict[str, Any], dict[str, Any], str], str]
  legend: str
  dash: str
  key: Optional[str] = None
  group: int = 0


def _pm(s: dict[str, Any], key: str, spec: str, sep: str = " ± ") -> str:
  """``mean ± std`` of a summary column (``-`` when absent)."""
  if s.get(key) is None:
    return "-"
  std = s.get(key + "_std")
  return _fmt(s[key], spec) + ("" if std is None else
                               sep + _fmt(std, spec.lstrip("+")))


def _get(spec: str, key: str, where: str = "s"):
  def cell(s, c, sep):
    del sep
    return _fmt((s if where == "s" else c).get(key), spec)
  return cell


def _mean_std(spec: str, key: str):
  return lambda s, c, sep: _pm(s, key, spec, sep)


_NOT_RECORDED = "not recorded (a file from before the field)"
_NO_SGD = "not applicable (no SGD run on the same seed)"

BENEFIT_COLUMNS: tuple[Column, ...] = (
    Column("FLOPs/SGD", 10, _get(".2f", "flops_ratio", "c"),
           "compiled FLOPs per training step / SGD's (a method that ran "
           "several static programs: amortized over them, listed below the "
           "table)", "not measured (no cost row)"),
    Column("time/SGD", 9, _get(".2f", "time_ratio", "c"),
           "median wall time per step / SGD's, interleaved with SGD in one "
           "process after training (amortized likewise; see the timing "
           "note)", "not measured (no cost row)"),
    Column("acc", 15, _mean_std(".4f", "test_acc"),
           "final test accuracy, mean ± std over seeds", _NOT_RECORDED,
           "test_acc"),
    Column("Δ vs SGD", 16, _mean_std("+.4f", "acc_minus_sgd"),
           "acc − SGD's acc on the same seed (paired), mean ± std", _NO_SGD),
    Column("peak acc", 15, _mean_std(".4f", "peak_test_acc"),
           "best test accuracy over the epochs, mean ± std", _NOT_RECORDED,
           "peak_test_acc", 1),
    Column("Δ peak", 16, _mean_std("+.4f", "peak_test_acc_minus_sgd"),
           "peak acc − SGD's on the same seed (paired)", _NOT_RECORDED,
           "peak_test_acc_minus_sgd", 1),
    Column("NLL", 8, _get(".4f", "test_nll"),
           "final test negative log-likelihood (nats), mean", _NOT_RECORDED,
           "test_nll", 1),
    Column("Δ NLL", 16, _mean_std("+.4f", "test_nll_minus_sgd"),
           "NLL − SGD's on the same seed (paired; lower is better)",
           _NOT_RECORDED, "test_nll_minus_sgd", 1),
    Column("ECE", 8, _get(".4f", "test_ece"),
           "final test expected calibration error, mean", _NOT_RECORDED,
           "test_ece", 1),
    Column("Δ ECE", 16, _mean_std("+.4f", "test_ece_minus_sgd"),
           "ECE − SGD's on the same seed (paired; lower is better)",
           _NOT_RECORDED, "test_ece_minus_sgd", 1),
    Column("train time/SGD", 15, _get(".2f", "train_time_ratio"),
           "training wall time / SGD's on the same seed (first step, which "
           "compiles, and evaluations excluded), mean", _NO_SGD),
    Column("acc@SGD time", 13, _get(".4f", "acc_at_sgd_budget"),
           "test acc after the last epoch that ended within SGD's mean "
           "training time", "no epoch ended within SGD's training time"),
    Column("|grad|", 8, _get(".3f", "grad_norm"),
           "whole-model gradient norm on 1024 training examples after "
           "training, mean", _NOT_RECORDED, "grad_norm"),
    Column("λmax", 8, _get(".2f", "hessian_top_eig"),
           "top Hessian eigenvalue on those examples (power iteration), "
           "mean", _NOT_RECORDED, "hessian_top_eig"),
)

TIMING_NOTE = (
    "Timing noise: FLOPs/SGD is deterministic, wall times are not. "
    "time/SGD is taken after training, each method's step (one fixed batch) "
    "interleaved with SGD's round by round in one process, as the median "
    "over the rounds of the mean step time in a round, divided by SGD's "
    "median; train time/SGD comes from the training runs themselves. On a "
    "shared CPU both move between runs of the same code (other processes, "
    "frequency scaling): compare methods within one table; the same "
    "method's ratio differs between runs.")


def columns_for(summary: dict[str, Any]) -> list[list[Column]]:
  """The tables' columns: those whose field some method recorded, by
  group (a group with none is left out)."""
  cols = [col for col in BENEFIT_COLUMNS
          if col.key is None or any(s.get(col.key) is not None
                                    for s in summary.values())]
  groups = sorted({c.group for c in cols})
  return [[c for c in cols if c.group == g] for g in groups]


def legend(cols: Sequence[Column], dashes: Sequence[str] = (),
           markdown: bool = True) -> list[str]:
  """What each column means, and ``-`` in the columns ``dashes`` names."""
  dash = [c for c in cols if c.header in dashes]
  if markdown:
    md = lambda h: h.replace("|", "\\|")
    return ["Columns: " + "; ".join(
        f"*{md(c.header)}*: {c.legend}" for c in cols) + "." + (
            " `-` in " + "; in ".join(f"*{md(c.header)}*: {c.dash}"
                                      for c in dash) + "." if dash else "")]
  return ([f"  {c.header}: {c.legend}" for c in cols] +
          [f"  '-' in {c.header}: {c.dash}" for c in dash])


def _rows(cols, cost, summary, sep):
  """Cells per method, and the headers of the columns with a ``-``."""
  rows, dashes = {}, set()
  for m, s in summary.items():
    rows[m] = [col.cell(s, cost.get(m, {}), sep) for col in cols]
    dashes.update(c.header for c, v in zip(cols, rows[m]) if v == "-")
  return rows, dashes


def terminal_table(task: str, cost: dict[str, Any], summary: dict[str, Any],
                   with_legend: bool = True) -> str:
  """The benefit table as ``benchmarks.run`` prints it (REPORT.md's
  columns)."""
  lines = [f"\n{task}"]
  width = max([15] + [len(m) + 1 for m in summary])
  for i, cols in enumerate(columns_for(summary)):
    rows, dashes = _rows(cols, cost, summary, "±")
    widths = [max(c.width, len(c.header) + 1) for c in cols]
    lines.append(f"{'method':<{width}}" + "".join(
        f"{c.header:>{w}}" for c, w in zip(cols, widths)))
    for m, cells in rows.items():
      lines.append(f"{m:<{width}}" + "".join(
          f"{v:>{w}}" for v, w in zip(cells, widths)))
    if i == 0:
      lines += [p for p in _program_lines(cost, list(summary)) if p]
    if with_legend:
      lines += legend(cols, dashes, markdown=False)
    lines.append("")
  return "\n".join(lines[:-1])


def benefit_tables(name: str, res: dict[str, Any],
                   images: Optional[dict[str, list[str]]] = None
                   ) -> list[str]:
  """REPORT.md's section of a ``benchmarks.run`` results file.

  Args:
    name: the file's name without ``.json``.
    res: its contents.
    images: per task, the image links to embed under its table.

  Returns:
    Markdown lines.
  """
  out = [f"### `{name}.json` (preset `{res.get('preset')}`)", "",
         _provenance_line(res["provenance"]), ""]
  if "cost_provenance" in res:
    out += ["Cost columns re-measured from the recorded runs (`--recost`): "
            + _provenance_line(res["cost_provenance"]), ""]
  for task, r in res["results"].items():
    t = r["task"]
    summary, cost = r["summary"], r.get("cost", {})
    out += [f"**{task}**: {t.get('epochs')} epochs, batch {t.get('batch')}, "
            f"SGD momentum 0.9, lr {t.get('lr')} cosine, weight decay "
            f"{t.get('weight_decay')}; mean ± std over seeds.", ""]
    for i, cols in enumerate(columns_for(summary)):
      out += ["| method | " + " | ".join(c.header.replace("|", "\\|")
                                         for c in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
      rows, dashes = _rows(cols, cost, summary, " ± ")
      for m, cells in rows.items():
        out.append(f"| {m} | " + " | ".join(cells) + " |")
      out += [""] + legend(cols, dashes) + [""]
      if i == 0:
        out += _program_lines(cost, list(summary))
    for link in (images or {}).get(task, []):
      out += [f"![{name} {task}]({link})", ""]
  return out


def _program_lines(cost: dict[str, Any], methods: list[str]) -> list[str]:
  """One line per method that ran several static programs: each program's
  share of the steps, its FLOPs and time ratios to SGD and (files measured
  since it was recorded) its kernel count."""
  lines = []
  for m in methods:
    c = cost.get(m, {})
    if not c.get("fractions"):
      continue
    parts = []
    for b, f in c["fractions"].items():
      row = cost.get(f"{m}[{b}]", {})
      kernels = (f", {row['kernels']} kernels" if "kernels" in row else "")
      parts.append(f"{b} {100 * f:.0f}% ({_fmt(row.get('flops_ratio'), '.2f')}"
                   f"x FLOPs, {_fmt(row.get('time_ratio'), '.2f')}x time"
                   f"{kernels})")
    lines.append(f"- {m}, amortized over its programs: " + "; ".join(parts))
  if lines and "kernels" in cost.get("sgd", {}):
    lines.insert(0, f"- sgd: one program of {cost['sgd']['kernels']} kernels "
                 "(top-level instructions of the compiled step that run: "
                 "fusions, dots, copies; on the CPU a small model's step "
                 "time follows their number)")
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
  plays = st.get("finetune_plays") or ""
  corpus = (plays.replace(",", ", ") if plays else "the comedies") + (
      f" (the first {st['finetune_chars']:,} characters of the training "
      "text)" if st.get("finetune_chars") else "")
  out = [f"### `{name}.json`", "", _provenance_line(res["provenance"]), "",
         f"Character-level Transformer LM (d_model {st['d_model']}, "
         f"{st['layers']} layers, context {st['seq_len']}, batch "
         f"{st['batch']}): pre-trained {pre['steps']} steps with AdamW on the "
         f"non-comedies (validation loss {pre['val_loss_pretrain_corpus']:.3f}"
         f"; {pre['val_loss_finetune_corpus']:.3f} on the comedies), then "
         f"fine-tuned {st['finetune_steps']} steps on {corpus} by each "
         "method with AdamW (lr "
         f"{st['finetune_lr']} cosine); validation on its held-out text, "
         "mean ± std over seeds; \"sgd\" is AdamW alone." + (
             f" *best val*: the lowest validation loss of the evaluations "
             f"every {st['eval_every']} steps and at the end (what early "
             "stopping reaches)." if st.get("eval_every") else ""), ""]
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
          "| method | val loss (nats/char) | Δ vs AdamW | best val | "
          "Δ best vs AdamW | perplexity | forgetting | "
          "Δ forgetting vs AdamW |",
          "|---|---|---|---|---|---|---|---|"]
  for m, s in res["summary"].items():
    out.append(f"| {m} | {_pm(s, 'val_loss', '.4f')} | "
               f"{_pm(s, 'val_loss_minus_base', '+.4f')} | "
               f"{_pm(s, 'best_val_loss', '.4f')} | "
               f"{_pm(s, 'best_val_loss_minus_base', '+.4f')} | "
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


def _pyplot():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return plt


def plot_benefit(name: str, res: dict[str, Any], out_dir: str
                 ) -> dict[str, str]:
  """Per task: test accuracy against training wall time, FLOPs bars.

  Returns:
    ``{task: path}`` of the PNGs written to ``out_dir``.
  """
  plt = _pyplot()
  if plt is None:
    return {}
  paths = {}
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
    cost = r.get("cost", {})
    names = [m for m in r["summary"] if "flops_ratio" in cost.get(m, {})]
    ax2.bar(names, [cost[m]["flops_ratio"] for m in names])
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel("compiled FLOPs per step / SGD")
    ax2.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}_{task}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    paths[task] = path
  return paths


# The acceptance band of issue 13: at most this wall time per step relative
# to SGD, and at least this fraction of SAM's paired gain.
BAND_TIME, BAND_GAIN = 1.25, 0.8


def pareto_points(cost: dict[str, Any], summary: dict[str, Any],
                  key: str = "acc_minus_sgd"
                  ) -> tuple[dict[str, tuple[float, float, float]],
                             list[str]]:
  """``{method: (time/SGD, gain, gain std)}`` and the methods left out.

  x is ``cost[method]["time_ratio"]`` (the amortized row for a method that
  ran several programs); y the paired gain over SGD ``summary[method][key]``
  with its std over seeds. A method lacking either is left out (named in
  the second result).
  """
  points, missing = {}, []
  for m, s in summary.items():
    x = cost.get(m, {}).get("time_ratio")
    y = s.get(key)
    if x is None or y is None:
      missing.append(m)
      continue
    points[m] = (float(x), float(y), float(s.get(key + "_std") or 0.0))
  return points, missing


_X_INTERLEAVED = ("wall time per step / SGD (interleaved medians; "
                  "amortized over programs)")


def _pareto_axes(ax, points, missing, what: str, *, scale: float = 100.0,
                 unit: str = "percentage points",
                 xlabel: str = _X_INTERLEAVED, base: str = "SGD",
                 ylabel: Optional[str] = None) -> None:
  """One Pareto panel: gain over the base (``scale`` x ``unit``) vs time.

  ``points``: ``{method: (time/base, gain, gain std)}``, gains positive
  when better than the base."""
  colors = {"sgd": "black", "sam": "tab:red"}
  cycle = [c for c in ("tab:blue", "tab:orange", "tab:green", "tab:purple",
                       "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
                       "tab:gray")]
  sam = points.get("sam")
  xs = [p[0] for p in points.values()] + [1.0, BAND_TIME]
  ys = [scale * p[1] for p in points.values()] + [0.0]
  if sam is not None:
    target = scale * BAND_GAIN * sam[1]
    ys.append(target)
    if sam[1] > 0:
      ax.fill_between([min(xs) - 1, BAND_TIME], target, max(ys) + 100,
                      color="tab:green", alpha=0.08, lw=0,
                      label="acceptance band")
    ax.axhline(target, color="tab:red", ls=":", lw=1.2,
               label=f"{BAND_GAIN:.0%} of SAM's gain (same run)")
  ax.axvline(BAND_TIME, color="tab:green", ls="--", lw=1.2,
             label=f"{BAND_TIME}x {base} time")
  ax.axhline(0.0, color="0.6", lw=0.8)
  pad_x = 0.05 * (max(xs) - min(xs) or 1.0)
  span = (max(ys) - min(ys)) or 1.0
  errs = [scale * p[2] for p in points.values()] or [0.0]
  xlim = (min(xs) - pad_x, max(xs) + 4 * pad_x)
  ylim = (min(ys) - max(errs) - 0.08 * span,
          max(ys) + max(errs) + 0.12 * span)
  ax.set_xlim(*xlim)
  ax.set_ylim(*ylim)
  # Labels in axes fractions, each moved to the first of a few offsets
  # that keeps it clear of those placed before (nearby points overlap).
  norm = lambda x, y: ((x - xlim[0]) / (xlim[1] - xlim[0]),
                       (y - ylim[0]) / (ylim[1] - ylim[0]))
  placed = []
  offsets = [(5, 4, "left"), (5, -11, "left"), (-5, 4, "right"),
             (-5, -11, "right"), (5, 14, "left"), (5, -21, "left")]
  i = 0
  markers = ("o", "s", "^", "D", "v", "P", "X")
  for m, (x, y, e) in points.items():  # the summary's order, in the legend
    marker = "o"
    if m not in colors:
      colors[m] = cycle[i % len(cycle)]
      marker = markers[(i // len(cycle)) % len(markers)]
      i += 1
    ax.errorbar([x], [scale * y], yerr=[scale * e], fmt=marker, ms=6,
                capsize=3, color=colors[m], label=m, zorder=3)
  if max(xs) / max(min(xs), 1e-9) > 4:  # e.g. 1-SAM at 7x: keep 1-2x legible
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator(
        [t for t in (1, 1.5, 2, 3, 5, 8, 12, 20) if t <= max(xs) * 1.2]))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%gx"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  # Many points: label SGD, SAM and the frontier (no other point is both
  # cheaper and better); the legend names the rest.
  labelled = set(points)
  if len(points) > 10:
    labelled = {m for m, (x, y, _) in points.items()
                if m in ("sgd", "sam") or not any(
                    (x2 <= x and y2 > y) or (x2 < x and y2 >= y)
                    for m2, (x2, y2, _) in points.items() if m2 != m)}
  for m, (x, y, e) in sorted(points.items(), key=lambda kv: kv[1][0]):
    if m not in labelled:
      continue
    px, py = norm(x, scale * y)
    for dx, dy, ha in offsets:
      # Offsets in points to axes fractions (a ~6.4x4.8 inch panel).
      lx, ly = px + 0.0022 * dx, py + 0.004 * dy
      w = (0.015 * len(m) + 0.01) * (1 if ha == "left" else -1)
      if all(abs(ly - qy) > 0.05 or
             max(lx, lx + w) < min(qx, qx + qw) or
             min(lx, lx + w) > max(qx, qx + qw)
             for qx, qy, qw in placed):
        break
    placed.append((lx, ly, w))
    ax.annotate(m, (x, scale * y), textcoords="offset points",
                xytext=(dx, dy), ha=ha, fontsize=8, color=colors[m],
                fontweight="bold" if m in ("sgd", "sam") else "normal")
  ax.set_xlabel(xlabel, fontsize=9)
  label = ylabel if ylabel is not None else f"{what} − {base}'s"
  ax.set_ylabel(f"{label}, paired over seeds\n({unit}, mean ± std)",
                fontsize=9)
  ax.grid(alpha=0.3)
  notes = []
  if sam is None:
    notes.append("no SAM in this run: no 80%-of-SAM line")
  else:
    notes.append(f"{BAND_GAIN:.0%} of SAM's gain: "
                 f"{scale * BAND_GAIN * sam[1]:+.{2 if scale >= 10 else 4}f} "
                 + ("pp" if unit == "percentage points" else unit) + (
                     "" if sam[1] > 0 else
                     " (SAM gains nothing: no acceptance band)"))
  if len(labelled) < len(points):
    notes.append("labelled: SGD, SAM and the frontier; the legend names all")
  if missing:
    notes.append("not plotted (no time or gain): " + ", ".join(missing))
  ax.set_title("\n".join([what] + notes), fontsize=9)


def _save_panels(plt, fig, axes, path: str) -> str:
  """One legend (the first panel's) to the right, then the PNG at ``path``."""
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
             fontsize=8, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_pareto(name: str, res: dict[str, Any], out_dir: str
                ) -> dict[str, str]:
  """Per task: each method's paired accuracy gain over SGD against its
  wall time per step relative to SGD, with the acceptance band (at most
  1.25x SGD's time, at least 80% of SAM's gain). All points of a chart come
  from one results file (one run); a second panel shows the peak-accuracy
  gain when the file has it.

  Returns:
    ``{task: path}`` of ``<name>_<task>_pareto.png`` written to ``out_dir``.
  """
  plt = _pyplot()
  if plt is None:
    return {}
  paths = {}
  prov = res.get("provenance", {})
  commit = str(prov.get("git_commit"))[:12]
  for task, r in res["results"].items():
    cost, summary = r.get("cost", {}), r["summary"]
    panels = [("acc_minus_sgd", "final test acc")]
    if any(s.get("peak_test_acc_minus_sgd") is not None
           for s in summary.values()):
      panels.append(("peak_test_acc_minus_sgd", "peak test acc"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8),
                             squeeze=False)
    for ax, (key, what) in zip(axes[0], panels):
      points, missing = pareto_points(cost, summary, key)
      _pareto_axes(ax, points, missing, what)
    seeds = prov.get("seeds")
    hp = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in kw.items())
                   for m, kw in (res.get("hparams") or {}).items() if kw)
    recost = res.get("cost_provenance", {}).get("date")
    fig.suptitle(f"{name}.json: {task}\none run: {prov.get('date', '?')}, "
                 f"commit {commit}, seeds {seeds}"
                 + (f"; {hp}" if hp else "")
                 + (f"\ntime/SGD re-measured from its runs on {recost}"
                    if recost else ""), fontsize=10)
    paths[task] = _save_panels(plt, fig, axes, os.path.join(
        out_dir, f"{name}_{task}_pareto.png"))
  return paths


def lm_pareto_points(summary: dict[str, Any], key: str
                     ) -> tuple[dict[str, tuple[float, float, float]],
                                list[str]]:
  """A fine-tuning run's ``{method: (time/base, gain, gain std)}`` and the
  methods left out: x the training time over the base's on the same seed
  (``train_time_ratio``), y the paired *reduction* ``-summary[m][key]`` of
  a lower-is-better figure (``val_loss_minus_base``,
  ``forgetting_minus_base``), so that, as in :func:`pareto_points`, up is
  better."""
  points, missing = {}, []
  for m, s in summary.items():
    x, y = s.get("train_time_ratio"), s.get(key)
    if x is None or y is None:
      missing.append(m)
      continue
    points[m] = (float(x), -float(y), float(s.get(key + "_std") or 0.0))
  return points, missing


def plot_lm_pareto(name: str, res: dict[str, Any], out_dir: str
                   ) -> Optional[str]:
  """A fine-tuning run's Pareto chart: each method's paired reduction of
  the validation loss (and of forgetting) against AdamW alone, against its
  training time relative to AdamW's on the same seed, with the acceptance
  band. None without SAM in the run or without matplotlib.

  Returns:
    The path of ``<name>_pareto.png`` written to ``out_dir``.
  """
  summary = res["summary"]
  plt = _pyplot()
  if plt is None or "sam" not in summary:
    return None
  panels = [("val_loss_minus_base", "validation loss reduction")]
  if any(s.get("forgetting_minus_base") is not None
         for s in summary.values()):
    panels.append(("forgetting_minus_base", "forgetting reduction"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8),
                           squeeze=False)
  for ax, (key, what) in zip(axes[0], panels):
    points, missing = lm_pareto_points(summary, key)
    _pareto_axes(ax, points, missing, what, scale=1.0, unit="nats/char",
                 xlabel="training time / AdamW's (same seed)",
                 base="AdamW", ylabel=f"{what} vs AdamW")
  prov = res.get("provenance", {})
  fig.suptitle(f"{name}.json\none run: {prov.get('date', '?')}, commit "
               f"{str(prov.get('git_commit'))[:12]}, seeds "
               f"{prov.get('seeds')}; \"sgd\" is AdamW alone", fontsize=10)
  return _save_panels(plt, fig, axes,
                      os.path.join(out_dir, f"{name}_pareto.png"))


def _sam_time_range(results: dict[str, dict[str, Any]]) -> Optional[str]:
  """SAM's time/SGD over the benefit files: the noise the note quotes."""
  ratios = sorted(
      (r.get("cost", {}).get("sam", {}).get("time_ratio"), f"{n}/{t}")
      for n, res in results.items() for t, r in res["results"].items()
      if r.get("cost", {}).get("sam", {}).get("time_ratio") is not None)
  if len(ratios) < 2:
    return None
  (lo, a), (hi, b) = ratios[0], ratios[-1]
  return (f"SAM's time/SGD, the same two passes every step, ranges from "
          f"{lo:.2f}x (`{a}`) to {hi:.2f}x (`{b}`) over the {len(ratios)} "
          "tables below (tasks differ too): read differences between tables "
          "within that spread as noise.")


def build(results_dir: str = RESULTS, *, include_tiny: bool = False,
          title: str = "## Results (generated by `python -m "
          "benchmarks.report`)") -> tuple[str, list[str]]:
  """REPORT.md's text and the PNGs drawn next to the JSON files.

  Args:
    results_dir: the folder of ``*.json`` results; the PNGs are written
      there and linked relative to it.
    include_tiny: also report ``tiny`` preset files (a run folder's own
      report; the recorded report skips them, their numbers mean nothing).
    title: the first line.

  Returns:
    The markdown and the paths of the images written.
  """
  md, images = [title, ""], []
  files = {}
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
      files[name] = json.load(f)
  benefit = {n: r for n, r in files.items() if "preset" in r and (
      include_tiny or r.get("preset") != "tiny")}
  if benefit:
    sam_range = _sam_time_range(benefit)
    md += [TIMING_NOTE + ("" if sam_range is None else " " + sam_range), "",
           "Pareto charts (`*_pareto.png`): x = time/SGD, y = Δ vs SGD with "
           "its std over seeds as error bars; dashed: "
           f"{BAND_TIME}x SGD's time, dotted: {BAND_GAIN:.0%} of SAM's gain "
           "in the same run (the acceptance band of issue 13, shaded when "
           "SAM gains). Each chart holds one results file, i.e. one run.", ""]
  for name, res in files.items():
    if res.get("preset") == "tiny" and name not in benefit:
      continue  # proves the harness; never quoted
    if "preset" in res:
      pareto = plot_pareto(name, res, results_dir)
      curves = plot_benefit(name, res, results_dir)
      links = {}
      for task in res["results"]:
        for p in (pareto.get(task), curves.get(task)):
          if p is not None:
            links.setdefault(task, []).append(
                os.path.relpath(p, results_dir))
            images.append(p)
      md += benefit_tables(name, res, links)
    elif res.get("kind") == "finetune_vision":
      md += finetune_vision_tables(name, res)
    elif "pretrain" in res:
      md += lm_tables(name, res)
      chart = plot_lm_pareto(name, res, results_dir)
      if chart is not None:
        images.append(chart)
        md += [f"![{name}]({os.path.relpath(chart, results_dir)})", ""]
    elif name.startswith("selection"):
      md += selection_tables(name, res)
    elif name.startswith("executor_cost"):
      md += executor_tables(name, res)
    elif "results" in res and all("methods" in r
                                  for r in res["results"].values()):
      md += cost_tables(name, res)
  return "\n".join(md), images


_IMAGE = re.compile(r"(!\[[^\]]*\]\()([^)]+\))")


def write_report(results_dir: str = RESULTS, *, readme: Optional[str] = None,
                 include_tiny: bool = False, title: Optional[str] = None
                 ) -> tuple[str, list[str]]:
  """Writes ``results_dir/REPORT.md`` (and its PNGs); optionally replaces
  README's generated block with the same text, image links made relative
  to README.

  Returns:
    The path of REPORT.md and the images.
  """
  kw = {} if title is None else {"title": title}
  text, images = build(results_dir, include_tiny=include_tiny, **kw)
  path = os.path.join(results_dir, "REPORT.md")
  with open(path, "w") as f:
    f.write(text + "\n")
  if readme is not None and os.path.exists(readme):
    rel = os.path.relpath(results_dir, os.path.dirname(readme))
    linked = _IMAGE.sub(lambda m: m.group(1) + rel + "/" + m.group(2), text)
    with open(readme) as f:
      old = f.read()
    if START in old and END in old:
      head, rest = old.split(START, 1)
      _, tail = rest.split(END, 1)
      with open(readme, "w") as f:
        f.write(head + START + "\n" + linked + "\n" + END + tail)
  return path, images


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--no-readme", action="store_true",
                      help="leave README.md's generated block as it is")
  parser.add_argument("--results-dir", default=RESULTS,
                      help="folder of results JSON (a run folder too)")
  args = parser.parse_args(argv)
  in_results = os.path.abspath(args.results_dir) == os.path.abspath(RESULTS)
  path, images = write_report(
      args.results_dir, include_tiny=not in_results,
      readme=README if in_results and not args.no_readme else None)
  with open(path) as f:
    print(f.read())
  print(f"wrote {path} and {len(images)} plot(s)")


if __name__ == "__main__":
  main()
