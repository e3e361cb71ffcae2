"""Markdown tables from the benchmark JSON files (for docs/benchmark.md).

    python -m benchmarks.report docs/benchmark/*.json
"""

from __future__ import annotations

import json
import sys


def research(report):
  lines = []
  env = report["environment"]
  lines.append(f"Seeds {report['seeds']}, {report['epochs']} epochs, lr {report['lr']}, "
               f"weight decay {report['weight_decay']}; {env['device_kind']}, JAX {env['jax']}, "
               f"torch {env['torch']}; {report['seconds'] / 60:.1f} min.\n")
  tasks = list(report["tasks"])
  configs = list(next(iter(report["tasks"].values())))
  header = "| config | " + " | ".join(
      f"{t.replace('_', ' ')} ({next(iter(report['tasks'][t].values()))['metric'].replace('_', ' ')})"
      for t in tasks) + " | state MiB |"
  lines += [header, "| --- |" + " ---: |" * (len(tasks) + 1)]
  for c in configs:
    cells = []
    for t in tasks:
      s = report["tasks"][t][c]
      cells.append(f"{s['final_mean']:.4f} [{s['final_min']:.4f}, {s['final_max']:.4f}]")
    state = report["tasks"][tasks[0]][c]["state_mib"]
    lines.append(f"| {c} | " + " | ".join(cells) + f" | {'-' if state is None else f'{state:.3f}'} |")
  return "\n".join(lines)


def memory(report):
  lines = [f"StateMemoryNet, {report['parameters']:,} parameters ({report['parameter_mib']:.3f} MiB), "
           f"batch {report['batch']}; {report['environment']['device_kind']}.\n",
           "| optimizer | state MiB | vs AdamW | XLA argument MiB | XLA output MiB | XLA temp MiB | peak step MiB |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, r in report["optimizers"].items():
    peak = "-" if r["peak_step_mib"] is None else f"{r['peak_step_mib']:.1f}"
    lines.append(f"| {name} | {r['state_mib']:.3f} | {r['state_vs_adamw']:.3f} | {r['xla_argument_mib']:.1f} | "
                 f"{r['xla_output_mib']:.1f} | {r['xla_temp_mib']:.3f} | {peak} |")
  return "\n".join(lines)


def speed(report):
  env = report["environment"]
  lines = [f"{env['device_kind']} ({env['cpu_count']} CPUs seen), JAX {env['jax']}, torch {env['torch']}, "
           f"median of {report['repeats']} steps.\n"]
  for label, size in report["sizes"].items():
    lines += [f"**{label}** ({size['parameters']:,} parameters; streaming {size['streaming_gb_per_s']:.1f} GB/s)\n",
              "| optimizer | median ms | vs adamw | vs apply_if_finite(adamw) | GB/s | of streaming | XLA temp MiB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in size["optimizers"].items():
      gbs = f"{r['gb_per_s']:.1f}" if "gb_per_s" in r else "-"
      frac = f"{r['fraction_of_streaming']:.2f}" if "fraction_of_streaming" in r else "-"
      lines.append(f"| {name} | {r['median_ms']:.3f} | {r['vs_adamw']:.3f} | {r['vs_adamw_if_finite']:.3f} | "
                   f"{gbs} | {frac} | {r['xla_temp_bytes'] / 2**20:.3f} |")
    for name, why in size.get("skipped", {}).items():
      lines.append(f"| {name} | not run: {why} | | | | | |")
    for name, r in size.get("torch", {}).items():
      lines.append(f"| {name} | {r['median_ms']:.3f} | - | - | - | - | - |  ")
    if "torch" in size:
      lines.append("")
      lines.append("stac_optax STAC default is faster than: " + ", ".join(
          f"{name} {r['stac_optax_speedup']:.1f}x" for name, r in size["torch"].items()))
    lines.append("")
  t = report["train_step"]
  lines.append(f"Whole train step, deep regression student: STAC default {t['STAC default']['median_ms']:.2f} ms, "
               f"AdamW {t['AdamW baseline']['median_ms']:.2f} ms (ratio {t['ratio_stac_to_adamw']:.3f}).")
  return "\n".join(lines)


def compile_times(report):
  env = report["environment"]
  sizes = report["sizes"]
  names = list(dict.fromkeys(n for s in sizes for n in s["optimizers"]))
  tree = report["tree"]
  lines = [f"{env['device_kind']} ({env['cpu_count']} CPUs seen), JAX {env['jax']}, optax {env['optax']}; "
           f"transformer-shaped params (d={tree['d']}, MLP {tree['ff']}, {tree['leaves_per_block']} leaves "
           f"a block); best of {report['compile_repeats']} compiles, median of {report['repeats']} steps.\n",
           "Compile time, s (and against AdamW's at the same size); the last column is the log-log slope "
           + (f"from {report['slope_from_leaves']:,} leaves on:\n" if report["slope_from_leaves"] else "over all sizes:\n"),
           "| optimizer | " + " | ".join(f"{s['leaves']:,} leaves" for s in sizes) + " | slope |",
           "| --- |" + " ---: |" * (len(sizes) + 1)]
  for name in names:
    cells = [f"{s['optimizers'][name]['compile_s']:.2f} ({s['optimizers'][name]['compile_vs_adamw']:.2f}x)"
             if name in s["optimizers"] else "-" for s in sizes]
    slope = report["compile_slope"].get(name)
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if slope is None else f'{slope:.2f}'} |")
  lines += ["", "Steady step, median ms (and against AdamW's):\n",
            "| optimizer | " + " | ".join(f"{s['leaves']:,} leaves" for s in sizes) + " |",
            "| --- |" + " ---: |" * len(sizes)]
  for name in names:
    cells = [f"{s['optimizers'][name]['median_ms']:.2f} ({s['optimizers'][name]['step_vs_adamw']:.2f}x)"
             if name in s["optimizers"] else "-" for s in sizes]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  skipped = {name: why for s in sizes for name, why in s.get("skipped", {}).items()}
  for name, why in skipped.items():
    lines.append(f"\n{name}: not run at the larger sizes, {why}.")
  return "\n".join(lines)


def stacked(report):
  env = report["environment"]
  lines = [f"{report['blocks']} blocks of width {report['width']}, {report['parameters']:,} parameters "
           f"({report['leaves']['unrolled']} arrays unrolled, {report['leaves']['stacked']} stacked); "
           f"{report['partition']}; {report['cut_arrays']} stacked arrays cut by the cap; "
           f"{env['device_kind']} ({env['cpu_count']} CPUs seen), JAX {env['jax']}.\n",
           "| optimizer, layout | first call s | step ms (median) | state MiB | XLA temp MiB |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for name, r in report["results"].items():
    lines.append(f"| {name} | {r['compile_s']:.2f} | {r['step_ms_median']:.2f} | "
                 f"{r['state_bytes'] / 2**20:.2f} | {(r['xla_temp_bytes'] or 0) / 2**20:.2f} |")
  lines.append("")
  lines += [f"{opt}: stacked/unrolled step {r['step']:.2f}x, first call {r['compile']:.2f}x."
            for opt, r in report["stacked_over_unrolled"].items()]
  return "\n".join(lines)


def order(report):
  lines = [f"{report['machine']}; fresh inits in registration order: {report['fresh_right_order']}, "
           f"false warnings {report['fresh_false_warnings']}; sorted dicts silent: "
           f"{report['jitted_silent']} (previous rule: {report['jitted_silent_old_rule']}); "
           f"small models' sorted dicts silent: {report['small_jitted_silent']} (previous rule: "
           f"{report['small_jitted_silent_old_rule']}).\n",
           "| model | counted modules | cap | fresh init | default cap right | jax.jit(init) | previous rule |",
           "| --- | ---: | ---: | --- | --- | --- | --- |"]
  for name, r in {**report["models"], **report["small_models"]}.items():
    lines.append(f"| {name} | {r['modules']} | {r['cap_size']} | {r['fresh']} | "
                 f"{'yes' if r['fresh_cap_right'] else 'no'} | {r['jitted']} | {r['old_rule']} |")
  return "\n".join(lines)


def _cell(value, fmt="{:.3f}", scale=1.0):
  return "-" if value is None else fmt.format(value * scale)


def gpu_check(report):
  env, torch_env = report["environment"], report["environment"].get("torch", {})
  lines = [f"{env.get('device_kind')} ({env.get('nvidia_smi') or ', '.join(env.get('jax_devices', []))}); "
           f"JAX {env.get('jax')}, PyTorch {torch_env.get('version')} (CUDA {torch_env.get('cuda')}); "
           f"{report.get('seconds', '?')} s" + ("" if report["complete"] else " (incomplete)") + ".\n",
           "| parity case | ok | worst abs diff | worst rel diff | steps |", "| --- | --- | ---: | ---: | ---: |"]
  for name, c in report.get("parity", {}).get("cases", {}).items():
    lines.append(f"| {name} | {c.get('ok', c.get('skipped'))} | {_cell(c.get('worst_abs_diff'), '{:.2e}')} | "
                 f"{_cell(c.get('worst_rel_diff'), '{:.2e}')} | {c.get('steps', '-')} |")
  if "bandwidth" in report:
    lines.append(f"\nCopy bandwidth {report['bandwidth']['copy_gb_per_s']:.0f} GB/s (read + write).\n")
  for label, size in report["sizes"].items():
    lines += [f"**{label}** ({size['model']}, {size['parameters']:,} parameters, {size['leaves']} leaves)\n",
              "| optimizer | median ms | vs adamw | of copy bandwidth | compile s | state MiB | XLA temp MiB | "
              "peak step MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in size["optimizers"].items():
      lines.append(f"| {name} | {_cell(r.get('median_ms'))} | {_cell(r.get('vs_adamw'))} | "
                   f"{_cell(r.get('fraction_of_copy'), '{:.2f}')} | {_cell(r.get('compile_s'), '{:.2f}')} | "
                   f"{_cell(r.get('state_bytes'), '{:.2f}', 2**-20)} | {_cell(r.get('xla_temp_bytes'), '{:.2f}', 2**-20)} | "
                   f"{_cell(r.get('peak_step_bytes'), '{:.1f}', 2**-20)} |")
    for name, why in {**size.get("skipped", {}), **size.get("errors", {})}.items():
      lines.append(f"| {name} | not measured: {why.strip().splitlines()[-1]} | | | | | | |")
    lines.append("")
  lines += ["| target | value | met |", "| --- | ---: | --- |"]
  lines += [f"| {t['target']} | {_cell(t['value'], '{:.3g}')} | {t['pass']} |" for t in report.get("targets", [])]
  return "\n".join(lines)


def main(paths):
  for path in paths:
    with open(path) as f:
      report = json.load(f)
    print(f"\n<!-- {path} -->\n")
    tables = {"research": research, "memory": memory, "speed": speed, "compile": compile_times,
              "stacked": stacked, "order": order, "gpu_check": gpu_check}
    print(tables[report["benchmark"]](report))


if __name__ == "__main__":
  main(sys.argv[1:])
