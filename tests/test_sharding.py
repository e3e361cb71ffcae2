"""STAC under JAX SPMD with params sharded over 8 simulated CPU devices.

Runs in a subprocess so that the device count does not affect the rest of the suite.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_runs_equal_the_single_device_run():
  env = {
      **os.environ,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "scripts", "sharded_check.py")],
      check=True, env=env, capture_output=True, text=True,
  ).stdout
  data = json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[7:])
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
