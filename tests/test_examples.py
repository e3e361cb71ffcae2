"""The examples run and do what they say (short runs)."""

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quickstart_trains_both_optimizers_and_stac_keeps_a_tenth_of_the_state():
  runs = _load("quickstart").main(["--steps", "60"])
  stac, adamw = runs
  for run in runs:
    assert run["val_loss"] < 0.8 * run["initial_val_loss"], run
  assert stac["state_mib"] < 0.15 * adamw["state_mib"]


def test_torch_migration_continues_the_run_exactly():
  out = _load("torch_migration").main(["--steps", "5"])
  assert out["parity"].ok
  assert out["worst_after_migration"] < 1e-5
  assert out["handed_back_step"] == 10
  assert out["losses"][-1] < out["losses"][0]
