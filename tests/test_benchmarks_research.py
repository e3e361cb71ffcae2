"""The research benchmark: quick runs give complete JSON, the scanned task's
student trains like its unrolled twin, bad arguments are refused."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, research


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


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


def test_research_scanned_sequence_student_trains_like_its_unrolled_twin():
  """The scanned task's student: the same weights stacked, the same steps.

  The steps are the benchmark's own (``research.train_step``, params and
  state donated) on batches of the task's shape: the unrolled one is the
  compile the quick sequence run above made."""
  unrolled_task = research.TASKS["sequence_classification"]
  scanned_task = research.TASKS["sequence_classification_scanned"]
  unrolled = unrolled_task.init_student(jax.random.key(3), quick=True)
  scanned = scanned_task.init_student(jax.random.key(3), quick=True)
  scanned_ff1 = np.asarray(scanned["layers"]["ff1"]["kernel"])  # the params are donated below
  rng = np.random.default_rng(0)
  batch = unrolled_task.batch
  batches = [(jnp.asarray(rng.integers(0, 256, (batch, 32))), jnp.asarray(rng.integers(0, 8, batch)))
             for _ in range(4)]
  losses = {}
  for name, task, params in (("unrolled", unrolled_task, unrolled), ("scanned", scanned_task, scanned)):
    for config in ("STAC default",):
      tx, step = research.train_step(task.name, config, quick=True)
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
  assert not np.allclose(p_b["layers"]["ff1"]["kernel"], scanned_ff1)


def test_research_refuses_unknown_configs_and_tasks(capsys):
  for argv, named in ((["--configs", "STAC default,adam"], "adam"), (["--tasks", "mnist"], "mnist")):
    with pytest.raises(SystemExit):
      research.main(argv)
    err = capsys.readouterr().err
    assert f"unknown ['{named}']" in err and "allowed:" in err
