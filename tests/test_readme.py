"""README.md: every ```python block runs, and its figures match the results.

The blocks run in order in one namespace (a later block may use the names an
earlier one defined), as a reader would paste them. The method table's
figures are read back from ``benchmarks/results/*.json``, so a result file
and the README cannot drift apart silently.
"""

import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _readme() -> str:
  with open(README, encoding="utf-8") as f:
    return f.read()


def python_blocks(text: str) -> list[str]:
  """The bodies of the ```python fenced blocks, in order."""
  return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_readme_is_short():
  assert len(_readme().splitlines()) <= 230


def test_readme_python_blocks_run():
  pytest.importorskip("flax")
  pytest.importorskip("sklearn")
  blocks = python_blocks(_readme())
  assert len(blocks) >= 2, "the README lost its examples"
  namespace = {"__name__": "__readme__"}
  for i, block in enumerate(blocks):
    code = compile(block, f"README.md python block {i}", "exec")
    exec(code, namespace)  # pylint: disable=exec-used


def test_readme_test_command_is_what_ci_runs():
  command = 'python3 -m pip install -e ".[test]" && python3 -m pytest -n auto'
  assert command in _readme()
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci = f.read()
  assert re.search(r'python3 -m pip install (-q )?-e "\.\[test\]" && '
                   r"python3 -m pytest -n auto", ci)


def _table_rows(text: str, header_start: str) -> dict[str, list[str]]:
  """The rows of the Markdown table whose header starts with header_start,
  keyed by the first cell's first code span (e.g. ``arsam(opt)``)."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines)
               if line.startswith(header_start))
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    name = re.match(r"`([^`]+)`", cells[0]).group(1)
    rows[name] = cells
  return rows


# README's method table: one run, side by side (the file's only task).
_README_FILE = "frontier_digits.json"
_README_SOURCES = {
    "plain(opt)": "sgd",
    "sam(opt, rho=0.05)": "sam",
    "gsam(opt)": "gsam",
    "fsam(opt)": "fsam",
    "sam(opt, m=1)": "sam@m=1",
    "looksam(opt, every=5, alpha=0.3)": "looksam@alpha=0.3",
    "arsam(opt, schedule=S.recompute_with_probability(0.1))":
        "arsam_bernoulli@p=0.1",
    "arsam(opt)": "arsam",
    "msam(opt)": "msam",
    "sam(opt, schedule=S.recompute_every(5), mixer=S.plain_mixer())":
        "periodic_sam@every=5",
    "sam(opt, schedule=S.late_phase(T, 0.25), mixer=S.plain_mixer())":
        "late_sam@fraction=0.25",
    "layerwise_sam(opt, budget=1.25)": "layerwise_sam@budget=1.25",
    # The rows marked with a dagger: a second run of the same task and seeds.
    "looksam(opt, every=5)": ("frontier_digits_more.json", "looksam"),
    "asam(opt, rho=0.5)": ("frontier_digits_more.json", "asam"),
    "esam(opt)": ("frontier_digits_more.json", "esam"),
    "slsam(opt)": ("frontier_digits_more.json", "slsam"),
    "sam_on(opt)": ("frontier_digits_ln.json", "sam_on"),
}

# The docs' method pages quote the 60-epoch noisy Fashion-MNIST MLP runs:
# method -> (result file, method key in it).
_SOURCES = {
    "sam": ("full_mlp_noise_long.json", "sam"),
    "asam": ("full_mlp_noise_long.json", "asam"),
    "layerwise_sam": ("full_mlp_noise_long_seed_methods.json",
                      "layerwise_sam"),
    "arsam": ("full_mlp_noise_long_seed_methods.json", "arsam"),
    "looksam": ("full_mlp_noise_long_seed_methods.json", "looksam"),
}


def _figures(name, key):
  with open(os.path.join(RESULTS, name), encoding="utf-8") as f:
    (task,) = json.load(f)["results"].values()
  return task["cost"][key], task["summary"][key]


def test_readme_method_table_matches_results():
  rows = _table_rows(_readme(), "| method | what it does |")
  for span, key in _README_SOURCES.items():
    name, key = key if isinstance(key, tuple) else (_README_FILE, key)
    cost, summary = _figures(name, key)
    row = rows[span]
    assert row[2] == f"{cost['flops_ratio']:.2f}", (span, row[2])
    assert row[3] == f"{cost['time_ratio']:.2f}", (span, row[3])
    if key == "sgd":
      assert row[4] == "0"
    else:
      delta = (f"{summary['acc_minus_sgd']:+.4f} ± "
               f"{summary['acc_minus_sgd_std']:.4f}")
      assert row[4] == delta, (span, row[4], delta)
  # A row without a source must say so with "-" (explained under the table).
  unsourced = [span for span in rows if span not in _README_SOURCES]
  for span in unsourced:
    assert rows[span][2:] == ["-", "-", "-"], (span, rows[span])
  if unsourced:
    assert "**`-`**" in _readme()


def test_readme_links_exist():
  text = _readme()
  for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
    assert os.path.exists(os.path.join(ROOT, target)), target


def test_every_method_has_a_docs_page():
  optax_sam = pytest.importorskip("optax_sam")
  import inspect  # pylint: disable=g-import-not-at-top
  pages = os.path.join(ROOT, "docs", "api", "methods")
  documented = {f[:-3] for f in os.listdir(pages)
                if f.endswith(".md") and not f.startswith("_")}
  functions = {name: getattr(optax_sam, name) for name in optax_sam.__all__}
  missing = []
  for name, fn in functions.items():
    if not inspect.isfunction(fn) or name == "sharpness_aware":
      continue
    params = list(inspect.signature(fn).parameters)
    if not params or params[0] != "optimizer":
      continue  # not a method factory
    aliases = {n for n, f in functions.items() if f is fn}
    if not aliases & documented:
      missing.append(name)
  assert not missing, (f"no docs/api/methods/<name>.md for {missing}: copy "
                       "docs/api/methods/_template.md")


def test_docs_method_pages_quote_the_recorded_figures():
  for method, (name, key) in _SOURCES.items():
    cost, summary = _figures(name, key)
    with open(os.path.join(ROOT, "docs", "api", "methods", f"{method}.md"),
              encoding="utf-8") as f:
      page = " ".join(f.read().split())
    assert f"FLOPs / SGD step {cost['flops_ratio']:.2f}" in page, method
    delta = (f"{summary['acc_minus_sgd']:+.4f} ± "
             f"{summary['acc_minus_sgd_std']:.4f}")
    assert f"Δ test acc vs SGD {delta}" in page, method


def test_readme_main_command():
  joined = re.sub(r" \\\n\s*", " ", _readme())  # join continued lines
  assert ('sudo apt-get update && sudo apt-get install -y '
          'dataset-fashion-mnist && python3 -m pip install -e ".[examples]" '
          "&& python3 -m benchmarks.run --preset quick") in joined


def test_readme_slsam_figures_match_results():
  with open(os.path.join(RESULTS, "slsam_cost.json"), encoding="utf-8") as f:
    gated = json.load(f)["results"]["mlp"]["gated_pass"]["0.5"]
  with open(os.path.join(RESULTS, "finetune_vision.json"),
            encoding="utf-8") as f:
    vision = json.load(f)["summary"]["slsam"]
  text = " ".join(_readme().split())
  assert (f"computes {gated['pass_flops_ratio_mean']:.2f} of a full "
          "gradient's FLOPs") in text
  assert (f"lost {-vision['test_acc_minus_base']:.4f} ± "
          f"{vision['test_acc_minus_base_std']:.4f} test accuracy") in text
