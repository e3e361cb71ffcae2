"""A run killed with SIGKILL resumes from its latest complete checkpoint, exactly.

``tests/scripts/crash_resume.py`` trains 10 steps with an Orbax
``CheckpointManager`` saving every 3 steps (``checkpoint.save_args``) and
restores with ``checkpoint.load_partition`` / ``checkpoint.restore``. It is
killed once between saves (after step 7) and once while the save of step 9
is being written; each time a fresh process resumes from step 6 and finishes.
The result must equal a run that was never killed, bit for bit. The three
first runs go at once, then the two resumes.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "crash_resume.py")
TIMEOUT_S = 120  # each phase; the whole test takes 20-40 s on a busy 2-core machine

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals (SIGSTOP, SIGKILL) to stop and kill the run"
)


class Run:
  """The script in a subprocess, its stdout read line by line in a thread."""

  def __init__(self, name, directory, *flags):
    self.name, self.directory = name, directory
    directory.mkdir(exist_ok=True)
    self.stderr_path = directory / f"{name}.err"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(self.stderr_path, "w") as err:
      self.proc = subprocess.Popen([sys.executable, SCRIPT, str(directory), *flags], env=env, cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=err, text=True)
    self.lines = queue.Queue()
    self.stdout = []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self.stdout.append(line.rstrip("\n"))
      self.lines.put(line.rstrip("\n"))
    self.lines.put(None)

  def fail(self, problem):
    err = self.stderr_path.read_text()[-3000:]
    pytest.fail(f"{self.name}: {problem}\nstdout:\n" + "\n".join(self.stdout[-20:]) + f"\nstderr:\n{err}")

  def wait_for(self, prefix):
    while True:
      try:
        line = self.lines.get(timeout=TIMEOUT_S)
      except queue.Empty:
        self.fail(f"no line starting {prefix!r} within {TIMEOUT_S} s")
      if line is None:
        self.fail(f"exited ({self.proc.wait()}) before printing {prefix!r}")
      if line.startswith(prefix):
        return line

  def wait_stopped(self):
    """Waits until the process has stopped itself (SIGSTOP), without reaping it."""
    self.wait_for("STOPPED")
    _, status = os.waitpid(self.proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
      self.fail(f"ended (wait status {status}) instead of stopping")

  def sigkill(self):
    os.kill(self.proc.pid, signal.SIGKILL)
    return self.proc.wait(timeout=TIMEOUT_S)

  def finish(self):
    try:
      code = self.proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      self.fail(f"did not finish within {TIMEOUT_S} s")
    if code != 0:
      self.fail(f"exited with {code}")
    return [json.loads(x[len("REPORT "):]) for x in self.stdout if x.startswith("REPORT ")]

  def kill_if_running(self):
    if self.proc.poll() is None:
      self.proc.kill()  # also ends a stopped process
      self.proc.wait()


def listing(directory):
  return sorted(os.listdir(directory / "ckpt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("crash")
  started = []
  try:
    straight = Run("straight", base / "straight")
    between = Run("between", base / "between", "--stop-after-step", "7")
    during = Run("during", base / "during", "--stop-in-save", "9")
    started += [straight, between, during]
    seen = {}
    for run in (between, during):
      run.wait_stopped()
      seen[run.name] = {"stopped": listing(run.directory)}  # what is on disk at the kill
      seen[run.name]["exit"] = run.sigkill()
      seen[run.name]["killed"] = listing(run.directory)
    resumed = {run.name: Run(run.name + "_resumed", run.directory) for run in (between, during)}
    started += list(resumed.values())
    out = {"base": base, "straight": straight.finish()}
    for name, run in resumed.items():
      out[name] = {**seen[name], "reports": run.finish(), "final_listing": listing(run.directory)}
    return out
  finally:
    for run in started:
      run.kill_if_running()


def assert_same_as_straight(runs, name):
  want = np.load(runs["base"] / "straight" / "final.npz")
  got = np.load(runs["base"] / name / "final.npz")
  assert sorted(got.files) == sorted(want.files)
  assert any("/mu/" in k for k in want.files) and "opt_state/nonfinite_skipped_steps" in want.files
  for key in want.files:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_the_straight_run_skipped_its_nan_steps(runs):
  start, end = runs["straight"]
  assert start["start"] == 0 and start["skipped_at_start"] == 0
  assert end == {"done": 10, "skipped": 2}


def test_killed_between_saves_resumes_exactly(runs):
  r = runs["between"]
  assert r["stopped"] == r["killed"] == ["3", "6"]  # nothing in flight when it died
  assert r["exit"] == -signal.SIGKILL
  start, end = r["reports"]
  assert start["start"] == 6 and start["all_steps"] == [3, 6]
  assert start["skipped_at_start"] == 1  # the NaN of step 1 is in the checkpoint
  assert end == {"done": 10, "skipped": 2}
  assert r["final_listing"] == ["6", "9"]  # max_to_keep=2
  assert_same_as_straight(runs, "between")


def test_killed_during_a_save_resumes_from_the_one_before(runs):
  r = runs["during"]
  # the save of step 9 had begun (its temporary directory existed) and not
  # been committed (no directory 9) when the process stopped and was killed
  incomplete = [n for n in r["stopped"] if n.startswith("9.") and "tmp" in n]
  assert incomplete and "9" not in r["stopped"], r["stopped"]
  assert r["killed"] == r["stopped"]
  assert r["exit"] == -signal.SIGKILL
  start, end = r["reports"]
  assert incomplete[0] in start["listing"]  # the resumed run saw it ...
  assert start["start"] == 6 and start["all_steps"] == [3, 6]  # ... and latest_step() ignored it
  assert start["skipped_at_start"] == 1
  assert end == {"done": 10, "skipped": 2}
  assert r["final_listing"] == ["6", "9"]  # it saved step 9 itself, over the remains
  assert_same_as_straight(runs, "during")

