"""The benchmarks' --quick modes run and write complete, well-formed JSON.

Timings are not checked here (they belong to the benchmark runs, not to tests).
"""

import json
import math

from benchmarks import common, memory, speed, stacked
from benchmarks import compile as compile_benchmark
from benchmarks import report as report_lib


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


def test_memory_quick_json(tmp_path):
  out = tmp_path / "memory.json"
  memory.main(["--quick", "--out", str(out), "--plot", str(tmp_path / "memory.png")])
  report = json.loads(out.read_text())
  assert report["benchmark"] == "memory" and report["environment"]["jax"]
  assert set(report["models"]) == set(memory.models(quick=True))
  for label, model in report["models"].items():
    names = set(memory.optimizers(memory.models(quick=True)[label]["params"], model["stacked_modules"]))
    assert set(model["optimizers"]) == names, label
    for name, r in model["optimizers"].items():
      assert all(_finite(r[k]) for k in ("state_mib", "peak_mib", "peak_bytes_per_parameter",
                                         "peak_vs_adamw", "state_vs_adamw")), (label, name)
      # the donated params and state are aliased: the peak holds them once
      assert r["alias_bytes"] >= r["state_bytes"] and r["peak_bytes"] == (
          r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]), (label, name)
    rows = model["optimizers"]
    # arithmetic, not measurement: the state is the cap's two moments (+ scalar counters)
    assert rows["STAC default"]["state_bytes"] < 0.3 * rows["AdamW baseline"]["state_bytes"], label
    assert rows["STAC default, no guard"]["peak_bytes"] <= rows["STAC default"]["peak_bytes"], label
  assert (tmp_path / "memory.png").stat().st_size > 5_000
  assert "| STAC default, no guard |" in report_lib.memory(report)


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


def test_report_prints_the_committed_results_with_the_documented_command():
  import pathlib  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(__file__).resolve().parents[1]
  paths = sorted(str(p.relative_to(root)) for p in (root / "docs" / "benchmark").glob("*.json"))
  prefixes = {p.rsplit("/", 1)[1].split("_")[0] for p in paths}
  assert {"compile", "memory", "order", "research", "speed", "stacked"} <= prefixes
  assert prefixes <= {"compile", "memory", "order", "research", "speed", "stacked", "gpu"}  # gpu_check_<device>.json
  done = subprocess.run([sys.executable, "-m", "benchmarks.report", *paths], cwd=root,
                        capture_output=True, text=True, check=True)
  for path in paths:
    assert f"<!-- {path} -->" in done.stdout
  assert "| STAC default |" in done.stdout


def test_gpu_check_smoke_writes_a_complete_report(tmp_path):
  """``bash scripts/gpu_check.sh --smoke`` (the prepared GPU check at tiny
  sizes on the CPU): every part done, parity met, every step measured."""
  import os  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  from benchmarks import gpu_check, gpu_parity  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(__file__).resolve().parents[1]
  done = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "--smoke", str(tmp_path)],
                        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  report = json.loads((tmp_path / "gpu_check.json").read_text())
  assert report["benchmark"] == "gpu_check" and report["smoke"] and report["complete"]
  assert {k: v["status"] for k, v in report["parts"].items()} == {
      "parity": "done", "bandwidth": "done", "tiny": "done", "leaves": "done"}
  assert report["environment"]["jax_devices"] and report["environment"]["versions"]["stac-optimizer"] == "0.3.0"
  cases = report["parity"]["cases"]
  assert set(cases) == set(gpu_parity.CASES) and all(c["ok"] for c in cases.values()), cases
  skip = cases["non-finite skip, bitwise"]
  assert skip["jax_bitwise_unchanged"] and skip["torch_bitwise_unchanged"]
  assert _finite(report["bandwidth"]["copy_gb_per_s"])
  for label, names in (("tiny", gpu_check.JAX_NAMES), ("leaves", gpu_check.SMOKE_LEAVES_JAX)):
    size = report["sizes"][label]
    assert not size["errors"] and not size["skipped"], size
    assert set(size["optimizers"]) == set(names) | set(gpu_check.TORCH_NAMES)
    for name, r in size["optimizers"].items():
      assert all(_finite(r[k]) for k in ("median_ms", "min_ms", "first_call_ms", "bytes_moved",
                                         "fraction_of_copy", "vs_adamw")), (label, name)
      assert isinstance(r["state_bytes"], int), (label, name)
      assert r["peak_step_bytes"] is None  # no memory statistics on the CPU
      if r["framework"] == "jax":
        assert _finite(r["compile_s"]) and isinstance(r["xla_temp_bytes"], int), (label, name)
      else:
        assert _finite(r["stac_optax_speedup"]), (label, name)
  assert report["sizes"]["leaves"]["leaves"] == 21 and _finite(report["sizes"]["tiny"]["guard_fraction"])
  # the same cap in both frameworks (PyTorch's stac-optimizer counts the twin's modules)
  for size in report["sizes"].values():
    assert size["optimizers"]["PyTorch STAC default"]["cap_parameters"] == size["cap_parameters"]
  assert all(t["pass"] in (True, False) and _finite(t["value"]) for t in report["targets"])
  assert report["targets"][-1]["target"].startswith("parity") and report["targets"][-1]["pass"]
  assert (tmp_path / "gpu_check.png").stat().st_size > 5_000
  assert "gpu_check:" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_starts_nothing_past_its_budget(tmp_path):
  from benchmarks import gpu_check  # pylint: disable=import-outside-toplevel

  report = gpu_check.main(["--smoke", "--budget-s", "0.01", "--parts", "tiny", str(tmp_path)])
  assert list(report["parts"]) == ["bandwidth", "tiny"] and report["complete"]
  size = report["sizes"]["tiny"]
  assert not size["optimizers"] and not size["errors"]
  assert set(size["skipped"]) == set(gpu_check.JAX_NAMES) | set(gpu_check.TORCH_NAMES)
  assert all(why.startswith("time budget") for why in size["skipped"].values())
  assert all(t["pass"] is None for t in report["targets"])  # nothing measured, nothing claimed
  saved = json.loads((tmp_path / "gpu_check.json").read_text())
  assert saved["sizes"]["tiny"]["skipped"] == size["skipped"]


def test_gpu_check_groups_fit_an_h100():
  """Arithmetic, not measurement: at 1B parameters the steps timed together
  fit each framework's share of an 80 GB H100; at 100M they all run together."""
  import math  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  import stac_optax  # pylint: disable=import-outside-toplevel
  from benchmarks import gpu_check  # pylint: disable=import-outside-toplevel

  total = 85_520_809_984  # an H100 80GB HBM3 as PyTorch reports it
  names = [*gpu_check.JAX_NAMES, *gpu_check.TORCH_NAMES]
  # the cap of a small net of the same modules (eval_shape's dicts come back in sorted key order)
  cap_names = stac_optax.partition_modules(common.state_memory_net(width=8)).adamw_parameter_names
  for label, width in gpu_check.SIZES.items():
    shapes = jax.eval_shape(lambda width=width: common.state_memory_net(width=width))
    sizes = {name: math.prod(x.shape) for name, x in stac_optax._tree.leaves_with_names(shapes)}
    n = sum(sizes.values())
    cap = sum(sizes[p] for p in cap_names)
    limits = gpu_check.memory_limits(n, total, 0.45 * total)
    groups = gpu_check.groups_of(names, n, cap, limits)
    assert sorted(sum(groups, [])) == sorted(names), label
    for group in groups:
      for framework, limit in limits.items():
        used = sum(gpu_check.resident_bytes(name, n, cap) for name in group
                   if (name in gpu_check.TORCH_NAMES) == (framework == "torch"))
        assert used <= limit or len(group) == 1, (label, group)
    if label == "1B":
      assert 1.0e9 < n < 1.05e9 and len(groups) == 5
      assert all(gpu_check.resident_bytes(name, n, cap) <= limits[
          "torch" if name in gpu_check.TORCH_NAMES else "jax"] for name in names)
    else:
      assert groups == [names], label
