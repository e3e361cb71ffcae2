"""One prepared GPU check: parity with stac-optimizer, step speed and memory, in one process.

Run it through its wrapper, which brings stac-optimizer 0.3.0 and 0.1.5 (from
the environment, else from the wheels in .whl/, installed with --no-index into
a temporary folder) and sets JAX's memory options before JAX starts:

    bash scripts/gpu_check.sh --prepare          # here, with network: fetch the wheels into .whl/
    bash scripts/gpu_check.sh OUTDIR             # on the CUDA machine (built to end within 8 minutes)
    bash scripts/gpu_check.sh --smoke OUTDIR     # anywhere: tiny sizes, JAX and PyTorch on the CPU

Through the device tool, from the checkout it sends, after --prepare there
(a rerun of parts left out: add `--parts 1B,leaves --budget-s 150`, timeout_s=210):

    run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=480)

The parts, in order, each stopped at its share of --budget-s (default 360 s:
nothing new starts after that; one compile already begun may run over):
  environment  jax.devices(), driver, JAX/jaxlib/CUDA/PyTorch versions.
  parity       stac_optax against stac-optimizer with both on the same device:
               default, AMSGrad, maximize (check_parity, 20 steps), the 0.1.x
               momentum variant against 0.1.5, a scanned twin of an unrolled
               PyTorch model, and the non-finite skip, which must leave every
               parameter and moment bit for bit as it was, in both frameworks.
  bandwidth    a device-to-device copy (PyTorch copy_) and JAX's in-place
               streaming pass over a 1 GiB buffer; the faster is the copy
               bandwidth every step is measured against.
  13M, 100M, 1B  StateMemoryNet shapes; leaves: a transformer of 517 small
               leaves. On each, the jitted donated step (update and
               apply_updates) of STAC default (guarded), STAC without its
               guard (stac(..., skip_nonfinite=False)), optax.adamw,
               apply_if_finite(optax.adamw) and optax.lion, and PyTorch's
               STAC 0.3.0 (default, foreach) and
               fused AdamW, timed in turns (as many as fit in memory together;
               at 1B one or two at a time): median per step, the bytes the
               update rules must move as a fraction of the copy bandwidth,
               compile time, optimizer state bytes, XLA's temporary bytes and
               the step's peak device memory (memory_stats()).

OUTDIR gets gpu_check.json (rewritten after every part, so that a part that
fails or a run that is stopped keeps what finished), gpu_check.png (step time
against size for both frameworks) and gpu_check.log (what it printed). The
JSON's "targets" section says which of the GPU targets the figures meet.
"""

# ruff: noqa: E402
from __future__ import annotations

import importlib.util
import os
import sys

NEEDED = ("jax", "optax", "flax", "chex", "numpy", "torch", "matplotlib", "stac_optimizer")
if __name__ == "__main__" and any(importlib.util.find_spec(m) is None for m in NEEDED):
  sys.exit(f"gpu_check: {sys.executable} has no {[m for m in NEEDED if importlib.util.find_spec(m) is None]}; "
           "stac-optimizer comes with `bash scripts/gpu_check.sh --prepare` (network) and carry=['.whl'].")

# Before JAX starts: it would take 75% of the GPU's memory at its first
# allocation, and PyTorch shares the process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import argparse
import contextlib
import functools
import gc
import json
import math
import pathlib
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp

import stac_optax
from benchmarks import common, gpu_parity, machine, speed
from benchmarks import compile as compile_benchmark

SIZES = {"13M": 1024, "100M": 2880, "1B": 9216}  # StateMemoryNet widths
SMOKE_SIZES = {"tiny": 64}
SMOKE_NET = {"n_blocks": 2}  # the smoke StateMemoryNet: 2 residual blocks, not 6 (fewer leaves)
LEAVES = {"n_blocks": 32, "d": 128, "ff": 512, "vocab": 1024}  # 16 * 32 + 5 = 517 leaves
SMOKE_LEAVES = {"n_blocks": 1}
SMOKE_LEAVES_JAX = ("STAC default", "AdamW baseline")  # the smoke run's many-leaves part: fewer compiles
JAX_NAMES = ("STAC default", "STAC default, no guard", "AdamW baseline", "optax.lion",
             "AdamW + apply_if_finite")
TORCH_NAMES = ("PyTorch STAC default", "PyTorch STAC foreach", "PyTorch AdamW fused")
RULES = {  # update rule and whether the step reads the gradients once more to check them
    "STAC default": ("stac", True), "STAC default, no guard": ("stac", False),
    "AdamW baseline": ("adamw", False), "AdamW + apply_if_finite": ("adamw", True),
    "optax.lion": ("lion", False), "PyTorch STAC default": ("stac", True),
    "PyTorch STAC foreach": ("stac", True), "PyTorch AdamW fused": ("adamw", False),
}
WEIGHTS = {"parity": 24, "bandwidth": 3, "13M": 12, "100M": 12, "1B": 23, "leaves": 24}
PARITY_STEPS, SMOKE_PARITY_STEPS = 20, 2


# -- the run: budget, incremental JSON ------------------------------------------------


class Run:
  """The report, written to ``outdir`` after every part, and the time budget."""

  def __init__(self, outdir: pathlib.Path, budget_s: float, parts: list[str], report: dict):
    self.outdir, self.report = outdir, report
    self.start = time.perf_counter()
    self.end = self.start + budget_s
    total, done = sum(WEIGHTS.get(p, 12) for p in parts), 0.0
    self.plan = {}
    for part in parts:  # each part's share, and where the schedule would have it end
      done += WEIGHTS.get(part, 12)
      self.plan[part] = (budget_s * WEIGHTS.get(part, 12) / total, self.start + budget_s * done / total)

  def deadline(self, part: str) -> float:
    """A part may use what earlier parts left of the schedule, at least half its share, never past the end."""
    share, planned_end = self.plan[part]
    return min(self.end, max(planned_end, time.perf_counter() + 0.5 * share))

  def save(self) -> None:
    path = self.outdir / "gpu_check.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(self.report, indent=2, default=str))
    os.replace(tmp, path)

  @contextlib.contextmanager
  def part(self, name: str):
    """Runs a part; an exception is recorded in the JSON and the next part goes on."""
    entry = self.report["parts"].setdefault(name, {})
    entry["status"] = "running"
    began, cpu = time.perf_counter(), time.process_time()
    print(f"== {name} (at {began - self.start:.0f} s of {self.end - self.start:.0f})", flush=True)
    try:
      deadline = self.deadline(name)
      yield lambda: deadline - time.perf_counter()  # the seconds left to the part
      entry["status"] = "done"
    except Exception:  # pylint: disable=broad-except
      entry["status"] = "error"
      entry["error"] = traceback.format_exc(limit=-6)
      print(entry["error"], flush=True)
    finally:
      entry["seconds"] = round(time.perf_counter() - began, 2)
      entry["cpu_seconds"] = round(time.process_time() - cpu, 2)
      free_memory()
      self.save()


def free_memory() -> None:
  gc.collect()
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def parity(run: Run, left: Callable[[], float], device: str, steps: int) -> None:
  results = run.report["parity"] = {"torch_device": device, "cases": {}}
  gpu_parity.run_cases(results["cases"], left, device, steps, run.save)


# -- bandwidth ---------------------------------------------------------------------------


def torch_copy_run(n: int, device: str):
  import torch  # pylint: disable=import-outside-toplevel

  src = torch.randn(n, device=device)
  dst = torch.empty_like(src)
  sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

  def run(steps=1):
    for _ in range(steps):
      dst.copy_(src)
    sync()

  run()
  return run


def bandwidth(run: Run, left: Callable[[], float], device: str, n: int, repeats: int) -> None:
  passes = 1 if n < 2**24 else 8  # a call of several passes, so that one sync is a small part of it
  runs = {"JAX streaming pass (x <- a * x + b, donated)": functools.partial(speed.streaming_run(n), passes),
          "PyTorch copy_": functools.partial(torch_copy_run(n, device), passes)}
  times = speed.interleaved(runs, repeats, budget_s=max(0.5, min(5.0, left() / 2)))
  rates = {name: 8 * n * passes / median / 1e9 for name, (median, _) in times.items()}
  run.report["bandwidth"] = {"elements": n, "bytes_per_pass": 8 * n, "gb_per_s": rates,
                             "copy_gb_per_s": max(rates.values())}
  print("  " + ", ".join(f"{k}: {v:.0f} GB/s" for k, v in rates.items()), flush=True)


# -- speed and memory --------------------------------------------------------------------


def resident_bytes(name: str, n: int, cap: int) -> int:
  """What a step holds on the device: params, gradients, state (and foreach's signs)."""
  state = {"stac": 2 * cap, "adamw": 2 * n, "lion": n}[RULES[name][0]]
  return 4 * (2 * n + state + (n if name == "PyTorch STAC foreach" else 0))


def groups_of(names, n: int, cap: int, limits: dict) -> list[list[str]]:
  """The runs timed in turns together: in order, as many as fit each framework's memory."""
  groups, current, used = [], [], {"jax": 0, "torch": 0}
  for name in names:
    framework = "torch" if name in TORCH_NAMES else "jax"
    need = resident_bytes(name, n, cap)
    if current and used[framework] + need > limits[framework]:
      groups.append(current)
      current, used = [], {"jax": 0, "torch": 0}
    current.append(name)
    used[framework] += need
  return groups + [current] if current else groups


def memory_limits(n: int, total: float = math.inf, jax_limit: float = math.inf) -> dict:
  """Bytes each framework may fill at a time, from the device's memory and
  JAX's share of it (read from the device when not given; unbounded on a CPU)."""
  if total == math.inf:
    torch = sys.modules["torch"]
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "bytes_limit" in stats and torch.cuda.is_available():
      total, jax_limit = torch.cuda.get_device_properties(0).total_memory, stats["bytes_limit"]
  if total == math.inf:
    return {"jax": math.inf, "torch": math.inf}
  return {"jax": 0.7 * jax_limit - 4 * n,  # the shared original params stay
          "torch": 0.7 * (total - jax_limit)}


def jax_peak_step_bytes(step) -> int | None:
  """Device memory one step takes above what is held before it (None where
  the backend keeps no statistics). JAX cannot reset its peak, so a ballast
  first lifts what is in use above the peak so far: the step's own peak is
  then a new one."""
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  gap, chunk = stats["peak_bytes_in_use"] - stats["bytes_in_use"] + 2**20, 2**30
  ballast = [jnp.zeros((min(chunk, gap - start) // 4 + 1,), jnp.float32) for start in range(0, gap, chunk)]
  jax.block_until_ready(ballast)
  before = device.memory_stats()["bytes_in_use"]
  step(1)
  peak = device.memory_stats()["peak_bytes_in_use"]
  del ballast
  return int(peak - before)


def torch_peak_step_bytes(step, device: str) -> int | None:
  torch = sys.modules["torch"]
  if torch.device(device).type != "cuda":
    return None
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  before = torch.cuda.memory_allocated()
  step(1)
  return int(torch.cuda.max_memory_allocated() - before)


class SizeRun:
  """The steps of one model size: built, timed in turns and measured, group by group."""

  def __init__(self, run: Run, left: Callable[[], float], params, options, jax_names=JAX_NAMES):
    self.run, self.left, self.params, self.options = run, left, params, options
    self.jax_names = jax_names
    part = stac_optax.partition_modules(params)
    sizes = dict((name, x.size) for name, x in stac_optax._tree.leaves_with_names(params))
    self.n = int(sum(sizes.values()))
    self.cap = int(sum(sizes[p] for p in part.adamw_parameter_names))
    self.factories = common.optimizers(part, guard_variants=True)
    self.makers = common.torch_optimizers()
    self.longest_compile = 0.0

  def build(self, name: str, entry: dict):
    """A runnable step of ``name`` and its first figures, or None (skipped or failed)."""
    if self.left() < (max(10.0, 2 * self.longest_compile) if name in JAX_NAMES else 3.0):
      entry["skipped"][name] = f"time budget ({self.left():.0f} s left)"
      return None
    try:
      if name in JAX_NAMES:
        step, info = compile_benchmark.compiled_step(self.factories[name](), self.params)
        self.longest_compile = max(self.longest_compile, info["compile_s"] + info["lower_s"])
      else:
        step, info = common.torch_step(self.makers[name], self.params, self.options.torch_device)
        info["compile_s"] = None  # eager
    except Exception:  # pylint: disable=broad-except
      entry["errors"][name] = traceback.format_exc(limit=-4)
      free_memory()
      return None
    entry["optimizers"][name] = {"framework": "torch" if name in TORCH_NAMES else "jax", **info}
    return step

  def time_group(self, steps: dict, entry: dict, label: str) -> None:
    per_call = {}
    for name, step in steps.items():  # steps per call: a call long enough that one sync is a small part of it
      began = time.perf_counter()
      step(1)
      once = time.perf_counter() - began
      per_call[name] = 1 if self.options.min_call_s <= 0 else max(1, min(256, math.ceil(
          self.options.min_call_s / max(once, 1e-6))))
    calls = {name: functools.partial(step, per_call[name]) for name, step in steps.items()}
    budget_s = max(0.5, min(self.options.timing_s, self.left() - 5)) / max(len(calls), 1)
    times = speed.interleaved(calls, self.options.repeats, budget_s=budget_s, label=label)
    for name, (median, best) in times.items():
      entry["optimizers"][name].update({"median_ms": 1e3 * median / per_call[name],
                                        "min_ms": 1e3 * best / per_call[name], "steps_per_call": per_call[name],
                                        "timed_in_turns_with": sorted(set(steps) - {name})})
    for name, step in steps.items():
      try:
        peak = (torch_peak_step_bytes(step, self.options.torch_device) if name in TORCH_NAMES
                else jax_peak_step_bytes(step))
      except Exception as e:  # pylint: disable=broad-except
        peak = None
        entry["optimizers"][name]["peak_step_error"] = repr(e)[:300]
      entry["optimizers"][name]["peak_step_bytes"] = peak

  def build_group(self, group: list[str], entry: dict) -> dict:
    steps = {}
    for name in sorted(group, key=lambda x: x in JAX_NAMES):  # PyTorch's first: no compile to wait for
      step = self.build(name, entry)
      if step is not None:
        steps[name] = step
    return steps

  def measure(self, label: str, entry: dict) -> None:
    entry["groups"] = groups_of([*self.jax_names, *TORCH_NAMES], self.n, self.cap, memory_limits(self.n))
    for i, group in enumerate(entry["groups"]):
      steps = self.build_group(group, entry)
      try:
        if steps:
          self.time_group(steps, entry, f"{label}: {len(steps)} steps")
      except Exception:  # pylint: disable=broad-except
        entry["errors"][f"group {i}: {', '.join(steps)}"] = traceback.format_exc(limit=-4)
      del steps  # the next group's buffers need the room
      free_memory()
      self.run.save()


def derive(entry: dict, copy_gb_per_s: float | None) -> None:
  """Ratios, bytes and bandwidth fractions of one size's measured steps."""
  entry["optimizers"] = {n: entry["optimizers"][n] for n in JAX_NAMES + TORCH_NAMES if n in entry["optimizers"]}
  timed = {name: r for name, r in entry["optimizers"].items() if "median_ms" in r}
  adamw = timed.get("AdamW baseline", {}).get("median_ms")
  stac = timed.get("STAC default", {}).get("median_ms")
  for name, r in timed.items():
    rule, guard = RULES[name]
    counts = {"sign": entry["parameters"] - entry["cap_parameters"], "adamw": entry["cap_parameters"]}
    r["bytes_moved"] = common.step_bytes(counts if rule == "stac" else {rule: entry["parameters"]},
                                         guard=guard)
    r["gb_per_s"] = r["bytes_moved"] / r["median_ms"] / 1e6
    r["fraction_of_copy"] = r["gb_per_s"] / copy_gb_per_s if copy_gb_per_s else None
    r["vs_adamw"] = r["median_ms"] / adamw if adamw else None
    if name in TORCH_NAMES and stac:
      r["stac_optax_speedup"] = r["median_ms"] / stac
  unguarded = timed.get("STAC default, no guard", {}).get("median_ms")
  entry["guard_fraction"] = 1 - unguarded / stac if stac and unguarded else None


def size_part(run: Run, left: Callable[[], float], label: str, params, options) -> None:
  smoke_leaves = options.smoke and label == "leaves"
  sizes = SizeRun(run, left, params, options, SMOKE_LEAVES_JAX if smoke_leaves else JAX_NAMES)
  entry = run.report["sizes"][label] = {
      "model": "StateMemoryNet" if label in SIZES or label in SMOKE_SIZES else "transformer (many leaves)",
      "parameters": sizes.n, "leaves": len(jax.tree.leaves(params)), "cap_parameters": sizes.cap,
      "optimizers": {}, "skipped": {}, "errors": {}}
  sizes.measure(label, entry)
  derive(entry, run.report.get("bandwidth", {}).get("copy_gb_per_s"))
  stac = entry["optimizers"].get("STAC default", {})
  print(f"  {label}: {entry['parameters']:,} parameters, STAC default {stac.get('median_ms', float('nan')):.3f} ms "
        f"= {stac.get('vs_adamw') or float('nan'):.2f}x adamw", flush=True)


# -- targets, plot, main -----------------------------------------------------------------


def targets(report: dict, large: list[str]) -> list[dict]:
  """The GPU targets, each with the measured value and whether it is met (None: not measured)."""
  sizes = report.get("sizes", {})

  def value(label, name, key):
    return sizes.get(label, {}).get("optimizers", {}).get(name, {}).get(key)

  rows = []

  def row(text, measured, ok):
    rows.append({"target": text, "value": measured, "pass": None if measured is None else bool(ok(measured))})

  for label in large:
    row(f"STAC default step <= 0.5x optax.adamw at {label}", value(label, "STAC default", "vs_adamw"),
        lambda v: v <= 0.5)
    row(f"STAC default moves its bytes at >= 0.8 of the copy bandwidth at {label}",
        value(label, "STAC default", "fraction_of_copy"), lambda v: v >= 0.8)
    row(f"the guard <= 10% of the STAC default step at {label}", sizes.get(label, {}).get("guard_fraction"),
        lambda v: v <= 0.1)
  for label in sizes:
    row(f"STAC default >= 5x faster than PyTorch STAC 0.3.0 default at {label}",
        value(label, "PyTorch STAC default", "stac_optax_speedup"), lambda v: v >= 5)
  cases = report.get("parity", {}).get("cases", {})
  ran = [c for c in cases.values() if "ok" in c]
  row("parity: every case within rtol 1e-5, atol 1e-6 (the suite's), the skip bit for bit; value: worst abs diff",
      max((c.get("worst_abs_diff", 0.0) for c in ran), default=None) if ran else None,
      lambda _: len(ran) == len(cases) and all(c["ok"] for c in ran))
  return rows


def plot(report: dict, path: pathlib.Path) -> None:
  plt = common.plt()
  fig, (ax, ax_leaves) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
  nets = [s for s in report["sizes"].values() if s["model"] == "StateMemoryNet"]
  for name in JAX_NAMES + TORCH_NAMES:
    points = [(s["parameters"], s["optimizers"][name]["median_ms"]) for s in nets
              if "median_ms" in s["optimizers"].get(name, {})]
    if points:
      ax.plot(*zip(*points, strict=True), "x--" if name in TORCH_NAMES else "o-", label=name)
  ax.set(xscale="log", yscale="log", xlabel="parameters (StateMemoryNet)", ylabel="median step time (ms)",
         title=f"optimizer step, {report['environment'].get('device_kind', '?')}")
  ax.grid(True, which="both", alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  leaves = next((s for s in report["sizes"].values() if s["model"] != "StateMemoryNet"), None)
  if leaves:
    timed = [(n, r["median_ms"]) for n, r in leaves["optimizers"].items() if "median_ms" in r]
    ax_leaves.barh([n for n, _ in timed], [t for _, t in timed],
                   color=["tab:red" if n in TORCH_NAMES else "tab:blue" for n, _ in timed])
    ax_leaves.set(xscale="log", xlabel="median step time (ms)",
                  title=f"{leaves['leaves']} leaves, {leaves['parameters']:,} parameters")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("outdir", help="folder for gpu_check.json and gpu_check.png")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, JAX and PyTorch on the CPU")
  parser.add_argument("--budget-s", type=float, default=None,
                      help="seconds for all parts (360; smoke 600, which a smoke run never needs)")
  parser.add_argument("--parts", default=None,
                      help="comma-separated subset of parity,bandwidth,13M,100M,1B,leaves (default: all)")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per step (40; smoke 3)")
  args = parser.parse_args(argv)
  sizes = SMOKE_SIZES if args.smoke else SIZES
  every = ["parity", "bandwidth", *sizes, "leaves"]
  args.parts = list(every) if args.parts is None else [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = sorted(set(args.parts) - set(every))
  if unknown:
    parser.error(f"--parts: unknown {unknown}; the parts are {','.join(every)}")
  if set(args.parts) - {"parity"}:
    args.parts.append("bandwidth")  # the steps are measured against it
  args.parts = [p for p in every if p in args.parts]
  args.budget_s = args.budget_s or (600.0 if args.smoke else 360.0)
  args.repeats = args.repeats or (3 if args.smoke else 40)
  args.torch_device = "cpu" if args.smoke else "cuda"
  args.min_call_s = 0.0 if args.smoke else 0.005
  args.timing_s = 10.0
  return args, sizes


def main(argv=None) -> dict:
  args, sizes = parse(argv)
  if args.smoke:
    common.select_device("cpu")
  outdir = pathlib.Path(args.outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  # in a smoke run, PyTorch's OpenMP threads would contend with XLA's on a small CPU
  with common.torch_threads(1 if args.smoke else None), common.logged(outdir / "gpu_check.log"):
    return check(args, sizes, outdir)


def check(args, sizes: dict, outdir: pathlib.Path) -> dict:
  report = {"benchmark": "gpu_check", "smoke": args.smoke, "complete": False, "budget_s": args.budget_s,
            "parts": {}, "lr": common.LR, "weight_decay": common.WD, "repeats": args.repeats,
            "environment": {}, "sizes": {}}
  run = Run(outdir, args.budget_s, args.parts, report)
  absent = machine.missing(args.smoke)
  if absent:
    report["error"] = "missing: " + "; ".join(absent)
    run.save()
    sys.exit("gpu_check cannot run; missing: " + "; ".join(absent))
  report["environment"] = machine.environment(args.smoke)
  run.save()
  print(f"JAX on {report['environment']['jax_devices']}; PyTorch on {args.torch_device}", flush=True)
  for note in report["environment"]["below_minimums"]:
    print(f"warning: {note}", flush=True)
  for part in args.parts:
    with run.part(part) as left:
      if part == "parity":
        parity(run, left, args.torch_device, SMOKE_PARITY_STEPS if args.smoke else PARITY_STEPS)
      elif part == "bandwidth":
        bandwidth(run, left, args.torch_device, 2**18 if args.smoke else 2**28, args.repeats)
      else:
        net = SMOKE_NET if args.smoke else {}
        params = (common.state_memory_net(width=sizes[part], **net) if part in sizes else
                  common.transformer_params(**(SMOKE_LEAVES if args.smoke else LEAVES)))
        size_part(run, left, part, params, args)
        del params
        try:
          plot(report, outdir / "gpu_check.png")
        except Exception:  # pylint: disable=broad-except
          report["plot_error"] = traceback.format_exc(limit=-3)
    report["targets"] = targets(report, list(sizes)[1:] or list(sizes))
  report["complete"] = True
  report["seconds"] = round(time.perf_counter() - run.start, 1)
  run.save()
  summary(report)
  return report


def summary(report: dict) -> None:
  print(f"\ngpu_check: {report['seconds']:.0f} s; parts: "
        + ", ".join(f"{k} {v['status']}" for k, v in report["parts"].items()))
  for t in report["targets"]:
    mark = {True: "met", False: "NOT met", None: "not measured"}[t["pass"]]
    shown = "-" if t["value"] is None else f"{t['value']:.3g}"
    print(f"  {mark:>12}  {shown:>9}  {t['target']}")


if __name__ == "__main__":
  main()
