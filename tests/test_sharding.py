"""STAC under JAX SPMD with params sharded over 8 simulated CPU devices.

Runs in a subprocess so that the device count does not affect the rest of the suite.
"""

from tests.conftest import run_script_on_simulated_devices


def test_sharded_runs_equal_the_single_device_run():
  data = run_script_on_simulated_devices("sharded_check.py")
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
