"""A run killed with SIGKILL resumes from its latest complete checkpoint, exactly.

``tests/scripts/crash_resume.py`` trains 10 steps with an Orbax
``CheckpointManager`` saving every 3 steps (``checkpoint.save_args``) and
restores with ``checkpoint.load_partition`` / ``checkpoint.restore``. One
run is killed twice, each time at a point the test checks on disk first:

1. run A, after step 4, between saves (checkpoint 3 complete, none in flight);
2. run B resumes from 3, saves 6, and is killed while the save of step 9 is
   being written (its temporary directory exists, ``9`` does not);
3. run C resumes from 6, which ``latest_step()`` finds past the unfinished 9,
   and finishes.

Beside them a run that is never killed goes at the same time as run A. Every
restored state (at 3 and at 6) and the end of run C must equal it, bit for
bit: params, optimizer state and skip counter.
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
TIMEOUT_S = 120  # each wait

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
  crashed = base / "crashed"
  started = []
  out = {"base": base}
  try:
    straight = Run("straight", base / "straight", "--dump-saves")
    run_a = Run("run_a", crashed, "--stop-after-step", "4")
    started += [straight, run_a]
    for flags in (None, ("--stop-in-save", "9")):
      run = run_a if flags is None else Run("run_b", crashed, *flags)
      started.append(run)
      run.wait_stopped()
      seen = {"stopped": listing(crashed)}  # what is on disk when it is killed
      seen["exit"] = run.sigkill()
      seen["killed"] = listing(crashed)
      seen["reports"] = [json.loads(x[len("REPORT "):]) for x in run.stdout if x.startswith("REPORT ")]
      out[run.name] = seen
    run_c = Run("run_c", crashed)
    started.append(run_c)
    out["run_c"] = {"reports": run_c.finish(), "final_listing": listing(crashed)}
    out["straight"] = straight.finish()
    return out
  finally:
    for run in started:
      run.kill_if_running()


def assert_same(runs, got, want):
  want = np.load(runs["base"] / "straight" / want)
  got = np.load(runs["base"] / "crashed" / got)
  assert sorted(got.files) == sorted(want.files)
  assert any("/mu/" in k for k in want.files) and "opt_state/nonfinite_skipped_steps" in want.files
  for key in want.files:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_the_straight_run_skipped_its_nan_steps(runs):
  start, end = runs["straight"]
  assert start["start"] == 0 and start["skipped_at_start"] == 0
  assert end == {"done": 10, "skipped": 2}


def test_killed_between_saves(runs):
  a = runs["run_a"]
  assert a["reports"][0]["start"] == 0
  assert a["stopped"] == a["killed"] == ["3"]  # nothing in flight when it died
  assert a["exit"] == -signal.SIGKILL


def test_resumed_after_a_kill_between_saves(runs):
  start = runs["run_b"]["reports"][0]
  assert start["start"] == 3 and start["all_steps"] == [3]
  assert start["skipped_at_start"] == 1  # the NaN of step 1 is in the checkpoint
  assert_same(runs, "start_3.npz", "at_3.npz")


def test_killed_during_a_save(runs):
  b = runs["run_b"]
  # the save of step 9 had begun (its temporary directory existed) and not
  # been committed (no directory 9) when the process stopped and was killed
  incomplete = [n for n in b["stopped"] if n.startswith("9.") and "tmp" in n]
  assert incomplete and "9" not in b["stopped"], b["stopped"]
  assert b["stopped"] == b["killed"] == ["3", "6", incomplete[0]]
  assert b["exit"] == -signal.SIGKILL


def test_resumed_after_a_kill_during_a_save(runs):
  incomplete = [n for n in runs["run_b"]["killed"] if "tmp" in n]
  start, end = runs["run_c"]["reports"]
  assert incomplete[0] in start["listing"]  # the resumed run saw the unfinished save ...
  assert start["start"] == 6 and start["all_steps"] == [3, 6]  # ... and latest_step() passed it by
  assert start["skipped_at_start"] == 1
  assert_same(runs, "start_6.npz", "at_6.npz")  # checkpoint 6 was written by a resumed run
  assert end == {"done": 10, "skipped": 2}
  assert runs["run_c"]["final_listing"] == ["6", "9"]  # it saved 9 over the remains; max_to_keep=2
  assert_same(runs, "final.npz", "final.npz")
