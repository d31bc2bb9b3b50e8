"""Worker of tests/test_multiprocess.py: a data-parallel run of some methods,
in one process of a ``jax.distributed`` job or alone.

Usage::

  python tests/_multiprocess_worker.py OUT NUM_PROCESSES PROCESS_ID PORT \
      DEVICES_PER_PROCESS

Every process holds the whole global batch and builds the global arrays from
it; the mesh is every device of the job (``NUM_PROCESSES *
DEVICES_PER_PROCESS``), the step a ``jit(shard_map)`` of ``make_update`` with
the method's ``axis_name``. Each process writes the final params and every
leaf of the optimizer state, per method, to ``OUT.<PROCESS_ID>.npz``; each
process also checks that what it holds of the replicated results is the same
on each of its devices. Run with ``JAX_PLATFORMS=cpu``; the device count is
set here before jax is imported.
"""

import os
import sys

OUT, NUM_PROCESSES, PROCESS_ID, PORT, DEVICES = sys.argv[1:6]
NUM_PROCESSES, PROCESS_ID, DEVICES = (int(NUM_PROCESSES), int(PROCESS_ID),
                                      int(DEVICES))
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    f"--xla_force_host_platform_device_count={DEVICES}"
    " --xla_backend_optimization_level=0")  # as conftest.py: compile-bound
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

# Exit status of a process whose jax.distributed.initialize raised (the
# test retries on another port, then skips with the message).
INIT_FAILED = 77
if NUM_PROCESSES > 1:
  try:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}",
                               num_processes=NUM_PROCESSES,
                               process_id=PROCESS_ID,
                               initialization_timeout=60)
  except Exception as e:  # pylint: disable=broad-except
    print(f"jax.distributed.initialize failed: {type(e).__name__}: {e}",
          file=sys.stderr, flush=True)
    sys.exit(INIT_FAILED)

import optax_sam  # pylint: disable=wrong-import-position
import reference  # pylint: disable=wrong-import-position

STEPS = 4
LR = 0.1


def jax_loss(params, x, y):  # the same MLP as tests/_util.py's jax_loss
  h = jax.numpy.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
  out = h @ params["out"]["w"] + params["out"]["b"]
  return jax.numpy.mean(jax.numpy.square(out - y))


METHODS = {
    "sam": lambda: optax_sam.sam(optax.sgd(LR, momentum=0.9), rho=0.05,
                                 axis_name="dev"),
    "layerwise_sam": lambda: optax_sam.layerwise_sam(
        optax.sgd(LR, momentum=0.9), rho=0.05, num_layers=1, every=2,
        axis_name="dev"),
    "arsam": lambda: optax_sam.arsam(
        optax.sgd(LR, momentum=0.9), rho=0.05, seed=2, axis_name="dev",
        schedule=optax_sam.schedules.recompute_with_probability(0.5)),
    "slsam": lambda: optax_sam.slsam(optax.sgd(LR, momentum=0.9), rho=0.05,
                                     fraction=0.5, axis_name="dev"),
}


def main():
  devices = jax.devices()
  assert len(devices) == NUM_PROCESSES * DEVICES, devices
  assert jax.process_count() == NUM_PROCESSES
  mesh = jax.make_mesh((len(devices),), ("dev",))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("dev"))

  def global_array(a, sharding):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

  p = reference.init_params(0)
  x, y = reference.make_data(1, n=4 * len(devices))
  params = jax.tree.map(lambda a: global_array(a, replicated), p)
  xs, ys = global_array(x, batch), global_array(y, batch)

  results = {}
  for name, make in METHODS.items():
    t0 = time.perf_counter()
    tx = make()
    step = optax_sam.make_update(tx, jax_loss)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(P(), P(), P("dev"), P("dev")),
                       out_specs=(P(), P()))
    def train(q, st, xb, yb, step=step):
      _, u, st = step(q, st, xb, yb)
      return optax.apply_updates(q, u), st

    state = jax.tree.map(lambda a: global_array(a, replicated),
                         tx.init(jax.tree.map(np.asarray, p)))
    q = params
    for _ in range(STEPS):
      q, state = train(q, state, xs, ys)
    leaves = jax.tree_util.tree_flatten_with_path((q, state))[0]
    for path, leaf in leaves:
      shards = [np.asarray(s.data) for s in leaf.addressable_shards]
      for s in shards[1:]:  # replicated: the same on every local device
        np.testing.assert_array_equal(s, shards[0])
      results[f"{name}/{jax.tree_util.keystr(path)}"] = shards[0]
    print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
  np.savez(f"{OUT}.{PROCESS_ID}.npz", **results)
  print(f"process {PROCESS_ID}/{NUM_PROCESSES}: {len(results)} arrays, "
        f"{len(devices)} devices", flush=True)
  if NUM_PROCESSES > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
