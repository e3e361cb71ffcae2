"""The parity part of the GPU check (``benchmarks/gpu_check.py``): stac_optax
against the PyTorch package ``stac-optimizer`` with both on one device.

The cases reuse the suite's twins and runners (``tests/test_parity_torch.py``,
``tests/test_stacked_parity.py``) and the public
``stac_optax.torch_interop.check_parity``, with the PyTorch side moved to the
device given; JAX runs on its default device.
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time
import traceback
import types
from collections.abc import Callable

import jax
import numpy as np

import stac_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tests_package():
  """The repository's ``tests`` folder as the package ``tests`` (a namespace
  package would lose to a regular ``tests`` package installed elsewhere)."""
  package = sys.modules.get("tests")
  if package is None or str(ROOT / "tests") not in list(getattr(package, "__path__", [])):
    package = types.ModuleType("tests")
    package.__path__ = [str(ROOT / "tests")]
    sys.modules["tests"] = package
  return package


def report_figures(report) -> dict:
  """The figures of a ``torch_interop.check_parity`` report."""
  return {"ok": report.ok, "steps": report.steps, "partition_matches": report.partition_matches,
          "worst_abs_diff": report.worst_abs_diff,
          "worst_rel_diff": max((p.max_rel_diff for p in report.parameters), default=0.0),
          "rtol": report.rtol, "atol": report.atol}


def twin_parity(config: str, device: str, steps: int) -> dict:
  from stac_optax import torch_interop  # pylint: disable=import-outside-toplevel
  from tests import test_parity_torch as tp  # pylint: disable=import-outside-toplevel

  tm, fm, _ = tp.make_pair("deep_classification")
  return report_figures(torch_interop.check_parity(
      tm.to(device), fm, steps=steps, learning_rate=1e-2, **tp.CONFIGS[config]))


def stacked_parity(device: str, steps: int) -> dict:
  from stac_optax import torch_interop  # pylint: disable=import-outside-toplevel
  from tests import stacked_models as sm  # pylint: disable=import-outside-toplevel
  from tests import test_stacked_parity as tsp  # pylint: disable=import-outside-toplevel

  # one jitted init (an eager one compiles each operation); its dicts come back
  # in sorted key order, which module_order= overrides, as it does nn.scan's
  params = jax.jit(sm.LinenScanNet().init)(jax.random.key(0), jax.numpy.ones((1, sm.WIDTH)))["params"]
  return report_figures(torch_interop.check_parity(
      tsp.TorchNet().to(device), params, steps=steps, stacked_modules=tsp.STACKED,
      module_order=sm.ORDER, learning_rate=1e-2, last_n_modules=3, weight_decay=0.1))


def momentum_parity(device: str, steps: int) -> dict:
  from tests import test_parity_torch as tp  # pylint: disable=import-outside-toplevel

  history = tp.run_momentum_variant(tp.load_stac015(), None, steps=steps, device=device)
  pairs = [pair for record in history for _, got, want, buffers in record
           for pair in [(got, want)] + ([buffers] if buffers is not None else [])]
  diffs = [np.abs(got - want) for got, want in pairs]
  return {"ok": all(np.allclose(got, want, rtol=tp.RTOL, atol=tp.ATOL) for got, want in pairs),
          "steps": steps, "worst_abs_diff": float(max(d.max() for d in diffs)),
          "worst_rel_diff": float(max((d / np.maximum(np.abs(w), np.finfo(np.float32).tiny)).max()
                                      for d, (_, w) in zip(diffs, pairs, strict=True))),
          "rtol": tp.RTOL, "atol": tp.ATOL}


def bits(arrays) -> list[bytes]:
  return [np.ascontiguousarray(np.asarray(a)).tobytes() for a in arrays]


def torch_tensors(run) -> list:
  params = list(run.model.parameters())
  states = [t for p in params for _, t in sorted(run.opt.state.get(p, {}).items()) if hasattr(t, "cpu")]
  return [t.detach().cpu().numpy() for t in params + states]


def nonfinite_skip(device: str, steps: int) -> dict:
  """``steps`` clean steps, and the same steps followed by one with a NaN
  gradient: every parameter and moment must be the same bits, in both."""
  from tests import test_parity_torch as tp  # pylint: disable=import-outside-toplevel

  args = ("deep_classification", {"lr": 1e-2}, {"learning_rate": 1e-2})
  clean = tp.run_updates(*args, steps=steps, device=device)
  skipped = tp.run_updates(*args, steps=steps + 1, nan_at=steps, device=device)
  jax_same = bits(jax.tree.leaves((clean.params, clean.state.inner_state))) == bits(
      jax.tree.leaves((skipped.params, skipped.state.inner_state)))
  torch_same = bits(torch_tensors(clean)) == bits(torch_tensors(skipped))
  counts = {"torch": skipped.opt.nonfinite_skipped_steps,
            "jax": int(stac_optax.nonfinite_skipped_steps(skipped.state))}
  return {"ok": bool(jax_same and torch_same and counts == {"torch": 1, "jax": 1}),
          "jax_bitwise_unchanged": jax_same, "torch_bitwise_unchanged": torch_same,
          "skipped_steps": counts, "steps": steps + 1, "worst_abs_diff": skipped.worst}


CASES = {
    "default": functools.partial(twin_parity, "default"),
    "amsgrad": functools.partial(twin_parity, "amsgrad"),
    "maximize": functools.partial(twin_parity, "maximize"),
    "0.1.x momentum (against 0.1.5)": momentum_parity,
    "stacked twin": stacked_parity,
    "non-finite skip, bitwise": nonfinite_skip,
}


def run_cases(results: dict, seconds_left: Callable[[], float], device: str, steps: int,
              save: Callable[[], None]) -> None:
  """Every case into ``results``; one that fails is recorded and the next
  goes on; none starts with less time left than 1.5 times the last took."""
  tests_package()
  last = 4.0
  for name, case in CASES.items():
    if seconds_left() < 1.5 * last:
      results[name] = {"skipped": f"time budget ({seconds_left():.0f} s left)"}
      continue
    began = time.perf_counter()
    try:
      results[name] = case(device, steps)
    except Exception:  # pylint: disable=broad-except
      results[name] = {"ok": False, "error": traceback.format_exc(limit=-4)}
    seconds = last = time.perf_counter() - began
    results[name]["seconds"] = round(seconds, 2)
    print(f"  parity {name}: {results[name].get('ok')} "
          f"(worst |diff| {results[name].get('worst_abs_diff', float('nan')):.2e})", flush=True)
    save()
