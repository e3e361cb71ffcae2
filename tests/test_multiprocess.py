"""STAC across two JAX processes (jax.distributed, CPU collectives over gloo).

Two processes with 2 CPU devices each form one 4-device mesh and train
``tests/scripts/multiprocess_train.py``; a third process runs the same steps
on 4 local devices. All three run at once, each with its own time limit.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "multiprocess_train.py")
TIMEOUT_S = 150  # the whole run takes 15-30 s on a busy 2-core machine
NAN_IN_DATA, NAN_IN_GRAD = 2, 5  # as in the script
LEARNING_RATE = 3e-2


def _gloo_missing() -> str | None:
  """Why this platform cannot run jax.distributed on CPUs, or None."""
  try:
    from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return f"cannot inspect jaxlib for CPU collectives: {e}"
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)"
  return None


def _free_port() -> int:
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(("localhost", 0))
      return s.getsockname()[1]
  except OSError as e:
    pytest.skip(f"cannot bind a TCP port on localhost for the jax.distributed coordinator: {e}")


def _env(local_devices: int) -> dict:
  return {
      **os.environ,
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}",
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  }


def _run_all(commands: dict, directory) -> dict:
  """Starts every command, waits for all; on a failure or the time limit kills
  the others (a process whose peer died would wait in a collective) and
  fails with every process's stderr. Returns each one's REPORT."""
  procs, logs = {}, {}
  try:
    for name, (argv, env) in commands.items():
      out, err = open(directory / f"{name}.out", "w"), open(directory / f"{name}.err", "w")
      logs[name] = (out, err)
      procs[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=ROOT)
    deadline = time.monotonic() + TIMEOUT_S
    problem = None
    while problem is None and any(p.poll() is None for p in procs.values()):
      failed = [n for n, p in procs.items() if p.returncode not in (None, 0)]
      if failed:
        problem = f"{failed} exited with {[procs[n].returncode for n in failed]}"
      elif time.monotonic() > deadline:
        problem = f"timed out after {TIMEOUT_S} s"
      else:
        time.sleep(0.2)
    if problem is None and any(p.returncode != 0 for p in procs.values()):
      problem = f"exit codes {[p.returncode for p in procs.values()]}"
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
    for out, err in logs.values():
      out.close()
      err.close()
  if problem is not None:
    tails = "\n".join(
        f"--- {name} (exit {procs[name].returncode}) stderr:\n"
        + (directory / f"{name}.err").read_text()[-3000:]
        for name in procs
    )
    pytest.fail(f"multi-process run failed: {problem}\n{tails}")
  reports = {}
  for name in procs:
    lines = (directory / f"{name}.out").read_text().splitlines()
    reports[name] = json.loads(next(x for x in lines if x.startswith("REPORT "))[len("REPORT "):])
  return reports


def test_two_processes_agree_with_each_other_and_with_one(tmp_path):
  reason = _gloo_missing()
  if reason:
    pytest.skip(reason)
  port = _free_port()
  worker = [sys.executable, SCRIPT, str(tmp_path)]
  commands = {
      f"process_{i}": ([*worker, str(i), "2", str(port)], _env(2)) for i in range(2)
  }
  commands["single"] = ([*worker, "single"], _env(4))
  reports = _run_all(commands, tmp_path)

  p0, p1, single = reports["process_0"], reports["process_1"], reports["single"]
  for i, r in enumerate((p0, p1)):
    assert (r["process_index"], r["process_count"], r["devices"], r["local_devices"]) == (i, 2, 4, 2), r
    # every parameter is split across the two processes: neither holds all of one
    assert r["param_leaves_spanning_processes"] == r["param_leaves"] == 20, r
    assert r["state_leaves_spanning_processes"] == 8, r  # mu and nu of the cap: layer_7, head
  assert (single["process_count"], single["devices"]) == (1, 4)

  # (a) the two processes hold the same params and optimizer state, bit for bit
  assert p0["params_digest"] == p1["params_digest"]
  assert p0["opt_state_digest"] == p1["opt_state_digest"]
  def shared(r):
    return [{k: v for k, v in s.items() if k != "local_x_finite"} for s in r["steps"]]

  assert shared(p0) == shared(p1)

  # (b) ... and the same as one process on 4 devices, up to float32 rounding of
  # the reductions (a trunk element whose gradient sign flipped would be off
  # by 2 * learning rate)
  ref = np.load(tmp_path / "single.npz")
  got = np.load(tmp_path / "process_0.npz")
  assert sorted(ref.files) == sorted(got.files)
  assert any(k.endswith("/mu/head/kernel") for k in ref.files)
  for key in ref.files:
    if key.startswith("params/"):
      np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-3 * LEARNING_RATE, err_msg=key)
    else:
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-5, err_msg=key)

  # (c) the NaNs start on process 1 only, and the step is skipped on both
  assert not p1["steps"][NAN_IN_DATA]["local_x_finite"]
  assert p0["steps"][NAN_IN_DATA]["local_x_finite"]
  assert p0["local_poison_nan"] == [False, False] and p1["local_poison_nan"] == [False, True]
  for r in (p0, p1, single):
    assert r["skipped"] == 2, r["name"]
    for s in r["steps"]:
      nan_step = s["step"] in (NAN_IN_DATA, NAN_IN_GRAD)
      assert s["params_unchanged"] == nan_step, (r["name"], s)
      assert s["state_unchanged"] == nan_step, (r["name"], s)
      assert s["skipped"] == (s["step"] >= NAN_IN_DATA) + (s["step"] >= NAN_IN_GRAD), (r["name"], s)
