"""Two processes (``jax.distributed`` on the CPU, 127.0.0.1) run the same
data-parallel steps as one process over the same global batch and mesh size.

The workers (``_multiprocess_worker.py``) run as subprocesses: a 2-process
job with 2 CPU devices each, and a 1-process run with 4 devices; each runs
``sam``, ``layerwise_sam``, ``arsam`` and ``slsam`` (``axis_name="dev"``,
``jit(shard_map(make_update))``) for a few steps and writes the params and
every optimizer-state leaf. Decisions (selections, recompute flags, counts,
keys: every integer and boolean leaf) must agree exactly; float leaves agree
up to the summation order of the cross-device mean, which differs between
the 2-process (gloo) and the in-process all-reduce (measured: at most
1.2e-7 absolute).
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import reference

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_multiprocess_worker.py")
TIMEOUT = 120  # seconds, per run
INIT_FAILED = 77  # the worker's exit status when initialize raised
METHODS = ("sam", "layerwise_sam", "arsam", "slsam")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # the worker sets its device count
  return env


def _launch(out, num_processes, devices, port):
  return [subprocess.Popen(
      [sys.executable, WORKER, out, str(num_processes), str(i), str(port),
       str(devices)], env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.communicate()


def _wait(procs):
  """Waits for every process, at most TIMEOUT seconds from now (then kills
  them all); returns ``[(returncode, output)]``."""
  deadline = time.monotonic() + TIMEOUT
  results = []
  try:
    for p in procs:
      out, _ = p.communicate(
          timeout=max(deadline - time.monotonic(), 0.1))
      results.append((p.returncode, out))
  except subprocess.TimeoutExpired:
    _kill(procs)
    pytest.fail(f"a worker ran past {TIMEOUT} s (killed)")
  return results


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  one = str(tmp / "one")
  single = _launch(one, 1, 4, 0)  # alongside the 2-process job
  try:
    for attempt in range(2):
      two = str(tmp / f"two{attempt}")
      results = _wait(_launch(two, 2, 2, _free_port()))
      if all(rc == 0 for rc, _ in results):
        break
      if not any(rc == INIT_FAILED for rc, _ in results):
        pytest.fail("2-process run failed:\n" + "\n".join(
            f"--- process {i}, exit {rc}:\n{out[-3000:]}"
            for i, (rc, out) in enumerate(results)))
    else:  # initialize raised twice (on two ports)
      reason = [out for rc, out in results if rc == INIT_FAILED][0]
      pytest.skip("jax.distributed on the CPU is not available here: "
                  + reason.strip().splitlines()[-1])
    (rc, out), = _wait(single)
  finally:
    _kill(single)  # a no-op once it has exited
  assert rc == 0, f"1-process run failed (exit {rc}):\n{out[-3000:]}"
  return (_load(one + ".0.npz"), _load(two + ".0.npz"),
          _load(two + ".1.npz"))


def test_processes_hold_identical_results(runs):
  _, p0, p1 = runs
  assert set(p0) == set(p1)
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one(runs, method):
  one, two, _ = runs
  keys = sorted(k for k in one if k.startswith(method + "/"))
  assert keys and keys == sorted(k for k in two
                                 if k.startswith(method + "/"))
  worst = 0.0
  for k in keys:
    a, b = one[k], two[k]
    assert a.dtype == b.dtype and a.shape == b.shape, k
    if np.issubdtype(a.dtype, np.floating):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=k)
      worst = max(worst, float(np.max(np.abs(b - a), initial=0.0)))
    else:  # decisions, counts, keys: exactly
      np.testing.assert_array_equal(b, a, err_msg=k)
  print(f"{method}: {len(keys)} arrays, largest float difference {worst:.3g}")
  # The run exercised the method's run-time decisions (both branches, a
  # changing selection), and training moved the parameters.
  counts = one[f"{method}/[1].branch_counts"]
  if method in ("layerwise_sam", "arsam"):
    assert np.count_nonzero(counts) >= 2, counts
  assert int(one[f"{method}/[1].count"]) == 4
  init = reference.init_params(0)
  for layer in init:
    for name, w0 in init[layer].items():
      moved = np.max(np.abs(one[f"{method}/[0]['{layer}']['{name}']"] - w0))
      assert moved > 1e-3, (layer, name, moved)

