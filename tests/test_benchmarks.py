"""The benchmarks' --quick modes run and write complete, well-formed JSON.

Timings are not checked here (they belong to the benchmark runs, not to tests).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, memory, research, speed, stacked
from benchmarks import compile as compile_benchmark


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


def test_memory_quick_json(tmp_path):
  out = tmp_path / "memory.json"
  memory.main(["--quick", "--out", str(out), "--plot", str(tmp_path / "memory.png")])
  report = json.loads(out.read_text())
  assert report["benchmark"] == "memory" and report["environment"]["jax"]
  names = set(common.optimizers(common.state_memory_net(width=64, d_in=32, d_out=4), guard_variants=True))
  assert set(report["optimizers"]) == names
  for r in report["optimizers"].values():
    assert all(_finite(r[k]) for k in ("state_mib", "xla_argument_mib", "xla_output_mib", "xla_temp_mib"))
  # arithmetic, not measurement: the state is the cap's two moments (+ scalar counters)
  assert report["optimizers"]["STAC default"]["state_bytes"] < 0.1 * report["optimizers"]["AdamW baseline"]["state_bytes"]
  assert (tmp_path / "memory.png").stat().st_size > 5_000


def test_state_memory_net_figures_are_exact():
  params = common.state_memory_net()
  sizes = {name: common.state_bytes(make().init(params)) for name, make in
           common.optimizers(params, peers=False).items() if name in ("STAC default", "AdamW baseline")}
  assert sum(x.size for x in __import__("jax").tree.leaves(params)) == 12_874_768
  assert round(sizes["STAC default"] / 2**20, 3) == 8.133
  assert round(sizes["AdamW baseline"] / 2**20, 3) == 98.227


def test_speed_quick_json(tmp_path):
  out = tmp_path / "speed.json"
  speed.main(["--quick", "--out", str(out), "--plot", str(tmp_path / "speed.png")])
  report = json.loads(out.read_text())
  size = report["sizes"]["tiny"]
  assert _finite(size["streaming_gb_per_s"]) and size["parameters"] > 0
  for name, r in size["optimizers"].items():
    assert _finite(r["median_ms"]) and _finite(r["vs_adamw"]) and _finite(r["vs_adamw_if_finite"]), name
  assert _finite(size["optimizers"]["STAC default"]["fraction_of_streaming"])
  assert set(size["torch"]) >= {"PyTorch STAC default", "PyTorch STAC foreach", "PyTorch AdamW"}
  assert _finite(report["train_step"]["ratio_stac_to_adamw"])


def test_compile_quick_json(tmp_path):
  out = tmp_path / "compile.json"
  compile_benchmark.main(["--quick", "--out", str(out), "--plot", str(tmp_path / "compile.png")])
  report = json.loads(out.read_text())
  assert report["benchmark"] == "compile" and report["environment"]["jax"]
  names = {"AdamW baseline", "AdamW + apply_if_finite", "STAC default", "STAC 0.1.x momentum",
           "STAC error_if_nonfinite", "STAC default, no guard", compile_benchmark.OLD_GUARD}
  assert [s["blocks"] for s in report["sizes"]] == list(compile_benchmark.QUICK_BLOCKS)
  for size in report["sizes"]:
    assert size["leaves"] == 16 * size["blocks"] + 5 and size["parameters"] > 0
    assert set(size["optimizers"]) | set(size["skipped"]) == names
    for name, r in size["optimizers"].items():
      assert all(_finite(r[k]) for k in ("lower_s", "compile_s", "first_call_ms", "median_ms", "min_ms",
                                         "compile_vs_adamw", "step_vs_adamw")), name
      assert isinstance(r["hlo_instructions"], int) and r["hlo_instructions"] > 0, name
  assert set(report["compile_slope"]) == names
  assert all(_finite(v) for v in report["compile_slope"].values())
  assert (tmp_path / "compile.png").stat().st_size > 5_000


@pytest.mark.parametrize("task,configs", [
    ("deep_regression", None),  # every config and peer
    ("sequence_classification", "STAC default"),  # the transformer student, beside PyTorch
])
def test_research_quick_json(tmp_path, task, configs):
  out = tmp_path / "research.json"
  research.main(["--quick", "--tasks", task, "--out", str(out), "--plot", str(tmp_path / "research.png")]
                + (["--configs", configs] if configs else []))
  report = json.loads(out.read_text())
  assert report["torch_side_by_side"]
  if configs is None:
    assert set(report["configs"]) == {
        "STAC default", "STAC full-decay trunk", "STAC wider cap", "AdamW baseline", "STAC 0.1.x momentum",
        "optax.lion", "optax.adafactor", "optax.contrib.muon", "optax.sign_sgd"}
  else:
    assert report["configs"] == configs.split(",")
  results = report["tasks"][task]
  assert set(results) == set(report["configs"]) | {"PyTorch STAC default", "PyTorch AdamW"}
  for r in results.values():
    assert len(r["final_per_seed"]) == 1 and len(r["curve_mean"]) == report["epochs"]
    assert _finite(r["final_mean"])
  # the port trains the same: identical data, weights and batches give the same result
  assert abs(results["STAC default"]["final_mean"] - results["PyTorch STAC default"]["final_mean"]) < 1e-3
  assert (tmp_path / "research.png").stat().st_size > 5_000


def test_stacked_quick_json(tmp_path):
  out = tmp_path / "stacked.json"
  stacked.main(["--quick", "--repeats", "3", "--out", str(out)])
  report = json.loads(out.read_text())
  assert report["benchmark"] == "stacked" and report["cut_arrays"] > 0
  results = report["results"]
  assert set(results) == {f"{o}, {layout}" for o in ("STAC default", "optax.adamw")
                          for layout in ("unrolled", "stacked")}
  for r in results.values():
    assert all(_finite(r[k]) for k in ("compile_s", "step_ms_median", "step_ms_best"))
  # the cap moments exist for the cap layers only: the same state as unrolled
  assert results["STAC default, stacked"]["state_bytes"] == results["STAC default, unrolled"]["state_bytes"]


def test_research_scanned_sequence_student_trains_like_its_unrolled_twin():
  """The scanned task's student: the same weights stacked, the same steps."""
  unrolled_task = research.TASKS["sequence_classification"]
  scanned_task = research.TASKS["sequence_classification_scanned"]
  unrolled = unrolled_task.init_student(jax.random.key(3), quick=True)
  scanned = scanned_task.init_student(jax.random.key(3), quick=True)
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.integers(0, 256, (8, 32))), jnp.asarray(rng.integers(0, 8, 8)))
             for _ in range(4)]
  losses = {}
  for name, task, params in (("unrolled", unrolled_task, unrolled), ("scanned", scanned_task, scanned)):
    factories = common.optimizers(params, peers=False, stacked_modules=task.stacked_modules)
    for config in ("STAC default",):
      tx = factories[config]()
      step = jax.jit(research.make_train_step(task, tx))
      p, state, out = params, tx.init(params), []
      for x, y in batches:
        p, state, loss = step(p, state, x, y)
        out.append(float(loss))
      losses[name, config] = (out, common.state_bytes(state), p)
  for config in ("STAC default",):
    (a, bytes_a, p_a), (b, bytes_b, p_b) = losses["unrolled", config], losses["scanned", config]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert bytes_a == bytes_b, config
    np.testing.assert_allclose(research.stack_layers(p_a)["layers"]["ff1"]["kernel"],
                               p_b["layers"]["ff1"]["kernel"], atol=1e-5)
  assert not np.allclose(p_b["layers"]["ff1"]["kernel"], scanned["layers"]["ff1"]["kernel"])


def test_research_refuses_unknown_configs_and_tasks(capsys):
  for argv, named in ((["--configs", "STAC default,adam"], "adam"), (["--tasks", "mnist"], "mnist")):
    with pytest.raises(SystemExit):
      research.main(argv)
    err = capsys.readouterr().err
    assert f"unknown ['{named}']" in err and "allowed:" in err


def test_report_prints_the_committed_results_with_the_documented_command():
  import pathlib  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(__file__).resolve().parents[1]
  paths = sorted(str(p.relative_to(root)) for p in (root / "docs" / "benchmark").glob("*.json"))
  assert {p.rsplit("/", 1)[1].split("_")[0] for p in paths} == {
      "compile", "memory", "research", "speed", "stacked"}
  done = subprocess.run([sys.executable, "-m", "benchmarks.report", *paths], cwd=root,
                        capture_output=True, text=True, check=True)
  for path in paths:
    assert f"<!-- {path} -->" in done.stdout
  assert "| STAC default |" in done.stdout
