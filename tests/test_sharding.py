"""STAC under JAX SPMD, with params sharded over 8 simulated CPU devices.

Every check runs in one subprocess (tests/scripts/simulated_devices.py): the
device count must be set before JAX starts, and the rest of the suite keeps one
device. Each test reads its check's report from it.
"""

import json

import numpy as np
import pytest

from tests.conftest import run_script_on_simulated_devices
from tests.optax_trees import CONFIGS


@pytest.fixture(scope="module")
def reports():
  return run_script_on_simulated_devices("simulated_devices.py")


def report_of(reports, check):
  """The report of ``check`` (a module of tests/scripts); fails with its traceback if it raised."""
  report = reports[check]
  assert "error" not in report, report["error"]
  return report


def test_sharded_runs_equal_the_single_device_run(reports):
  """examples/sharded_training.py's params, FSDP-style and on its data x model mesh."""
  data = report_of(reports, "sharded_check")
  for report in data["reports"]:
    assert report["devices"] == 8
    assert report["sharded_param_leaves"] >= 12, report  # the kernels really are split
    assert report["moment_shardings_match"], report  # AdamW moments follow their params
    assert report["trunk_state_leaves"] == 0, report  # the trunk adds no state
    assert report["max_param_diff"] <= 1e-6, report
    assert report["max_state_diff"] <= 1e-6, report
    assert report["skipped"] == 1, report
  example = data["example"]
  assert example["mesh"] == {"data": 2, "model": 4}
  assert example["last_loss"] < 0.1 * example["first_loss"]
  # every array of the cap's state is split 4 ways on the model axis (biases replicated)
  assert example["per_device_bytes"] < 0.5 * example["state_bytes"]


def test_sharded_stacked_arrays_keep_their_sharding_and_equal_one_device(reports):
  """The layer axis or a feature axis sharded, Auto and Explicit meshes."""
  reports = report_of(reports, "stacked_sharding_check")["reports"]
  assert len(reports) == 4
  for report in reports:
    assert report["devices"] == 8 and report["cut"] == "LayerSplit", report
    assert report["update_shardings_match"] and report["param_shardings_match"], report
    assert report["max_param_diff"] <= 1e-6 and report["max_state_diff"] <= 1e-6, report
    assert report["skipped"] == 1, report
    if report["sharded_over"] == "features":  # the cap moments stay split 8 ways
      assert report["cap_moment_spec"] == "P(None, None, 'x')", report
      assert report["cap_moment_devices"] == 8 and report["cap_moment_sharded"], report


def test_held_signs_under_sharding_equal_one_device(reports):
  """Kernels sharded along either axis, Auto and Explicit meshes."""
  reports = report_of(reports, "held_signs_sharding_check")["reports"]
  assert len(reports) == 4
  for report in reports:
    assert report["devices"] == 8 and report["held"], report
    assert report["update_shardings_match"], report
    assert report["max_param_diff"] <= 1e-6 and report["max_state_diff"] <= 1e-6, report
    assert report["skipped"] == 1, report


def test_sharding_on_eight_devices(reports):
  """State and updates keep the params' shardings, on explicit and auto meshes.

  Mirrors optax/_src/sharding_test.py::ShardingTest::test_state_sharding_type_init_match_update
  and ::test_state_sharding_type_preserved_with_jit (and their copies in
  optax/contrib/_sharding_test.py): on an explicit mesh the types
  (``jax.typeof``: shape, dtype, sharding) of eager init, jitted init and the
  updated state agree, and on both meshes every per-parameter slot of the
  state (eager init, updated state) and every update has its parameter's
  sharding, for every configuration of tests/optax_trees.py.
  """
  report = report_of(reports, "optax_sharding_check")
  assert report["devices"] == 8
  assert set(report["cases"]) == {f"{mesh}/{c}" for mesh in ("explicit", "auto") for c in CONFIGS}
  problems = {case: r["problems"] for case, r in report["cases"].items() if r["problems"]}
  assert not problems, json.dumps(problems, indent=1)
  for r in report["cases"].values():
    assert r["sharded_param_leaves"] > 0 and r["checked_slots"] >= 0


def test_sharded_init_recipe_keeps_the_creation_order_cap(reports):
  """Flax's sharded-initialisation recipe hands back a module in sorted attribute order."""
  report = report_of(reports, "sharded_init")
  assert report["devices"] == 8
  assert report["sharded_leaves"] >= 2, report
  assert report["attribute_order_after_jit"] == ["head", "mid", "stem"]  # NNX sorted it
  assert report["cap_from_model"] == ["head"], report
  assert report["cap_from_builder"] == ["head"], report
  assert report["warnings"] == [], report
  assert np.isfinite(report["loss"])
  assert report["skipped"] == 0, report
