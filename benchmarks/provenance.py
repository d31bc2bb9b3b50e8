"""Provenance recorded with every benchmark figure (BENCHMARKS.md)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any


def _version(pkg: str) -> str | None:
  try:
    return metadata.version(pkg)
  except metadata.PackageNotFoundError:
    return None


def git_commit() -> str | None:
  """The checkout's HEAD commit, with ``+dirty`` when code is modified
  (results files written by earlier runs do not count)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root,
                          capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain",
                            "--untracked-files=no", "--",
                            "optax_sam", "benchmarks",
                            ":(exclude)benchmarks/results"], cwd=root,
                           capture_output=True, text=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    return None
  return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_model() -> dict[str, Any]:
  """The host CPU's model name and widest vector ISA (CPU timings and even
  some float rounding differ between an AVX-512 and an AVX2-only machine, so
  figures pair only within one)."""
  name, flags = platform.processor() or None, set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
          name = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  isa = next((i for i in ("avx512f", "avx2", "avx", "sse4_2", "neon", "asimd")
              if i in flags), None)
  return {"cpu_model": name, "cpu_isa": isa}


def provenance(seeds: Any = None) -> dict[str, Any]:
  """Command, commit, versions, device and date of this run."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  argv0 = sys.argv[0] if sys.argv else ""
  if argv0.endswith(".py") and os.path.dirname(os.path.abspath(argv0)) == (
      os.path.dirname(os.path.abspath(__file__))):
    command = ["python", "-m", "benchmarks." + os.path.basename(argv0)[:-3]]
  else:
    command = [os.path.basename(sys.executable), argv0]
  return {
      "command": " ".join(command + sys.argv[1:]),
      "git_commit": git_commit(),
      "versions": {p: _version(p) for p in
                   ("jax", "jaxlib", "optax", "chex", "flax", "numpy")},
      "python": platform.python_version(),
      "device": {"platform": devices[0].platform,
                 "kind": devices[0].device_kind,
                 "count": len(devices),
                 "cpu_count": os.cpu_count(),
                 "machine": platform.machine(), **cpu_model()},
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "seeds": seeds,
  }


_START: dict[str, Any] = {}


def record_start() -> None:
  """Notes the commit and time when a benchmark starts (before it runs for
  an hour while the checkout may move on); ``write_result`` reports them."""
  _START["git_commit"] = git_commit()
  _START["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results")
RUNS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")


def new_run_dir(name: str, root: str | None = None) -> str:
  """Creates and returns ``<root>/<UTC timestamp>-<name>/`` for an ad-hoc
  run's results (``root`` defaults to the git-ignored ``benchmarks/runs``;
  only ``--record`` writes into ``benchmarks/results``). The timestamp is
  the run's start (``record_start``), else now; a clash gets a suffix."""
  root = root or RUNS_DIR
  started = _START.get("started")
  when = (datetime.datetime.fromisoformat(started) if started else
          datetime.datetime.now(datetime.timezone.utc))
  base = os.path.join(root, when.strftime("%Y%m%dT%H%M%SZ") + "-" + name)
  path, i = base, 1
  while True:
    try:
      os.makedirs(path)
      return path
    except FileExistsError:
      i += 1
      path = f"{base}-{i}"


def write_result(name: str, payload: dict[str, Any],
                 seeds: Any = None, results_dir: str | None = None) -> str:
  """Writes ``<results_dir>/<name>.json`` with provenance; returns its path.

  ``results_dir`` defaults to ``benchmarks/results`` (the record).
  """
  results_dir = results_dir or RESULTS_DIR
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f"{name}.json")
  with open(path, "w") as f:
    prov = provenance(seeds)
    prov.update(_START)  # commit and time at the start, when recorded
    json.dump({"provenance": prov, **payload}, f, indent=1,
              sort_keys=False, default=float)
    f.write("\n")
  return path
