"""The examples run and do what they say (short runs)."""

import importlib.util
import pathlib
import sys

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses (linen modules) look themselves up there
  spec.loader.exec_module(module)
  return module


def test_quickstart_trains_both_optimizers_and_stac_keeps_a_tenth_of_the_state():
  runs = _load("quickstart").main(
      ["--steps", "60", "--width", "64", "--blocks", "2", "--compiles", "1", "--steps-per-round", "5"])
  stac, adamw = runs
  assert [run["name"] for run in runs] == ["STAC", "AdamW"]
  assert stac["initial_val_loss"] == adamw["initial_val_loss"]  # the same initial weights
  for run in runs:
    assert run["val_loss"] < 0.8 * run["initial_val_loss"], run
    assert run["first_call_s"] > 0
    low, median, high = run["step_ms"]
    assert 0 < low <= median <= high
  assert stac["state_bytes"] < 0.15 * adamw["state_bytes"]


def test_torch_migration_continues_the_run_exactly():
  out = _load("torch_migration").main(["--steps", "5"])
  assert out["parity"].ok
  assert out["worst_after_migration"] < 1e-5
  assert out["handed_back_step"] == 10
  assert out["losses"][-1] < out["losses"][0]


def test_linen_train_state_trains():
  losses = _load("linen_train_state").main(["--steps", "80"])
  assert losses[-1] < 0.5 * losses[0]


def test_optax_chain_trains_with_warmup_cosine_and_accumulation():
  out = _load("optax_chain").main(["--steps", "120", "--accumulate", "2"])
  assert max(out["rates"]) > 10 * out["rates"][0] and out["rates"][-1] < max(out["rates"])
  assert sum(out["losses"][-10:]) < 0.5 * sum(out["losses"][:10])


def test_digits_trains_both_optimizers_to_high_accuracy_and_plots(tmp_path):
  png = tmp_path / "digits.png"
  runs = _load("digits").main(["--epochs", "3", "--out", str(png)])
  for run in runs:
    assert run["curve"][-1]["train_loss"] < 0.5 * run["curve"][0]["train_loss"]
    assert run["curve"][-1]["test_accuracy"] > 0.8  # chance is 0.1
  assert runs[0]["state_kib"] < 0.05 * runs[1]["state_kib"]
  assert png.stat().st_size > 10_000


def test_checkpointing_resumes_bit_for_bit_and_refuses_another_cap():
  out = _load("checkpointing").main(["--steps", "6"])
  assert out["bitwise_equal"]
  assert "module 'layers/6' moved: #7 of 10 (trunk) here, #7 of 10 (cap) there" in out["refused"]


def test_sharded_training_runs_on_the_devices_there_are():
  out = _load("sharded_training").main(["--steps", "60"])
  assert out["losses"][-1] < 0.1 * out["losses"][0]


def test_lora_finetuning_trains_only_the_adapters_with_a_fraction_of_adamws_state():
  runs = _load("lora_finetuning").main(["--steps", "60", "--layers", "4"])
  stac, adamw = runs["STAC (LoRA only)"], runs["AdamW (LoRA only)"]
  for run in (stac, adamw):
    assert run["frozen_unchanged"]
    assert run["last_loss"] < 0.5 * run["first_loss"], run
  assert stac["partition"].adamw_module_names == ("head/lora",)
  assert stac["state_bytes"] < 0.35 * adamw["state_bytes"]


def test_equinox_training_trains_both_optimizers_with_a_two_module_cap():
  out = _load("equinox_training").main(["--steps", "60"])
  assert out["cap"] == ("norm", "head") and out["trainable_modules"] == 15
  stac, adamw = out["runs"]
  for run in out["runs"]:
    assert run["val_loss"] < 0.2 * run["initial_val_loss"], run
  assert stac["skipped_steps"] == 0
  assert stac["state_mib"] < 0.05 * adamw["state_mib"]


def test_scanned_transformer_counts_layers_and_trains():
  out = _load("scanned_transformer").main(["--steps", "25", "--layers", "2"])
  part = out["partition"]
  assert part.trainable_module_count == 2 * 8 + 4
  assert part.module_names[2:4] == ("blocks/0/ln1", "blocks/0/attn/query")
  assert part.splits_layers  # the default cap ends inside the last block
  for name in ("STAC", "AdamW"):
    run = out[name]
    assert np.mean(run["losses"][-5:]) < 0.9 * np.mean(run["losses"][:5]), name
  assert out["STAC"]["state_bytes"] < 0.3 * out["AdamW"]["state_bytes"]


def test_nnx_checkpointing_resumes_an_nnx_optimizer_run_bit_for_bit():
  for args in ([], ["--pure"]):
    out = _load("nnx_checkpointing").main(["--steps", "3", *args])
    assert out["bitwise_equal"], args
    assert out["skipped"] == 1
    assert out["partition"].adamw_module_names == ("norm", "head")
