"""Runs sections of Flax's "Optimization Cookbook" guide with STAC in place of their optimizer.

    python tests/scripts/flax_cookbook.py GUIDE.md OUT.json

Each ``python`` block of the guide runs as written, in order, in one
namespace, except that every ``nnx.Optimizer`` it builds gets
``stac_optax.stac(model, 1e-3, wrt=wrt)`` with the same ``wrt``. Sections
whose subject is the transformation they build (per-parameter rates with
``optax.partition``, ``optax.MultiSteps``) and blocks that read
``optax.adam``'s state layout are not run. Writes each section's losses.
A fresh process: the guide sets ``jax_num_cpu_devices`` before JAX starts.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.setdefault("MPLBACKEND", "Agg")

SKIPPED_SECTIONS = ("Per-Parameter Learning Rates", "Gradient Accumulation")
LAYOUT_READS = "optimizer.opt_state[0]"  # optax.adam's state: STAC's has another layout


def sections(text: str) -> list[tuple[str, list[str]]]:
  """``(heading, python blocks)`` in order; the blocks before the first
  heading's section belong to the title."""
  out: list[tuple[str, list[str]]] = []
  for part in re.split(r"^# ", text, flags=re.M)[1:]:
    heading, _, body = part.partition("\n")
    out.append((heading.strip(), re.findall(r"```python\n(.*?)```", body, re.S)))
  return out


def main(guide: str, out_path: str) -> None:
  with open(guide) as f:
    parts = sections(f.read())
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import stac_optax  # pylint: disable=import-outside-toplevel

  original = nnx.Optimizer.__init__
  built: list[str] = []

  def with_stac(self, model, tx, *, wrt=nnx.Param, graph=None):
    built.append(type(tx).__name__)
    original(self, model, stac_optax.stac(model, 1e-3, wrt=wrt), wrt=wrt, graph=graph)

  nnx.Optimizer.__init__ = with_stac
  namespace: dict = {"__name__": "flax_cookbook"}
  report = {}
  for heading, blocks in parts:
    if heading in SKIPPED_SECTIONS:
      continue
    namespace.pop("losses", None)
    for block in blocks:
      if LAYOUT_READS in block:
        continue
      exec(compile(block, f"{heading}", "exec"), namespace)  # noqa: S102
    losses = namespace.get("losses")
    report[heading] = {
        "losses": [float(x) for x in losses] if losses is not None else None,
        "loss": float(namespace["loss"]) if "loss" in namespace else None,
    }
  report["optimizers_replaced"] = len(built)
  with open(out_path, "w") as f:
    json.dump(report, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
