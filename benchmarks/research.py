"""The research benchmark: four teacher-student tasks, five paired seeds.

Ported from the protocol of the PyTorch package's CUDA research benchmark
(held-out validation splits, seeded teachers, seeded student initialisation,
a fixed batch schedule per seed, lr 2e-3, weight decay 1e-2, per-epoch
validation curves), in JAX with models written as functions of plain param
dicts (so the partition reads their creation order):

* deep regression: 48-d inputs, a residual teacher (width 96, 5 blocks) with
  0.10 noise; student width 128, 10 blocks; MSE.
* deep classification: 64-d inputs, residual blocks with LayerNorm and a final
  LayerNorm, 6 classes = teacher argmax, 8% of train labels replaced; student
  width 128, 10 blocks; cross-entropy, accuracy.
* tail-norm classification: as above, student blocks without norm, then
  bridge / final_norm / head (the cap holds these).
* sequence classification: 256 tokens, length 32, pre-norm transformer
  encoders (teacher d=96, 4 layers, 4 heads, ff 384; student d=128, 8
  layers, 8 heads, ff 512), token + position embeddings, mean-pool, 8
  classes, 6% label noise, batch 96, 12 updates per epoch.
* its scanned variant: the same student with its layers stacked (one array
  per layer parameter, ``jax.lax.scan`` over them) and
  ``stacked_modules={'layers': 0}``; same weights, data and batches, so it
  should end where its unrolled twin does (STAC configs and AdamW only).

Configs: STAC default, full-decay trunk, wider cap, AdamW baseline (bias and
1-D exempt), the 0.1.x momentum variant, and optax.lion, optax.adafactor,
optax.contrib.muon, optax.sign_sgd. With torch and stac-optimizer installed,
PyTorch STAC default and PyTorch AdamW run on the same data, initial weights
and batches.

    python -m benchmarks.research [--quick] [--seeds 5] [--device cpu|gpu] [--out FILE] [--plot FILE]
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common

LN_EPS = 1e-5


# -- models as functions of param dicts ------------------------------------------


def _linear(key, n_in, n_out):
  bound = 1 / np.sqrt(n_in)  # PyTorch's nn.Linear initialisation
  k1, k2 = jax.random.split(key)
  return {"kernel": jax.random.uniform(k1, (n_in, n_out), minval=-bound, maxval=bound),
          "bias": jax.random.uniform(k2, (n_out,), minval=-bound, maxval=bound)}


def _norm(width):
  return {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}


def _layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + LN_EPS) * p["scale"] + p["bias"]


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


def init_mlp(key, d_in, width, d_out, n_blocks, *, block_norm, final_norm, bridge=False):
  keys = iter(jax.random.split(key, 2 * n_blocks + 3))
  params = {"stem": _linear(next(keys), d_in, width), "blocks": []}
  for _ in range(n_blocks):
    block = {"fc1": _linear(next(keys), width, width), "fc2": _linear(next(keys), width, width)}
    if block_norm:
      block["norm"] = _norm(width)
    params["blocks"].append(block)
  if bridge:
    params["bridge"] = _linear(next(keys), width, width)
  if final_norm:
    params["final_norm"] = _norm(width)
  params["head"] = _linear(next(keys), width, d_out)
  return params


def apply_mlp(params, x):
  x = _dense(params["stem"], x)
  for block in params["blocks"]:
    h = _dense(block["fc2"], _gelu(_dense(block["fc1"], x)))
    x = x + (_layer_norm(block["norm"], h) if "norm" in block else h)
  if "bridge" in params:
    x = _dense(params["bridge"], x)
  if "final_norm" in params:
    x = _layer_norm(params["final_norm"], x)
  return _dense(params["head"], x)


def init_encoder(key, vocab, length, d, n_layers, ff, n_classes):
  keys = iter(jax.random.split(key, 6 * n_layers + 3))
  params = {"token": {"embedding": jax.random.normal(next(keys), (vocab, d))},
            "position": {"embedding": jax.random.normal(next(keys), (length, d))},
            "layers": []}
  for _ in range(n_layers):
    params["layers"].append({
        "norm1": _norm(d),
        "attn": {name: _linear(next(keys), d, d) for name in ("query", "key", "value", "out")},
        "norm2": _norm(d),
        "ff1": _linear(next(keys), d, ff),
        "ff2": _linear(next(keys), ff, d),
    })
  params["final_norm"] = _norm(d)
  params["head"] = _linear(next(keys), d, n_classes)
  return params


def _encoder_layer(layer, x, heads):
  b, t, d = x.shape
  h = _layer_norm(layer["norm1"], x)

  def split(y):
    return y.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)

  q, k, v = (split(_dense(layer["attn"][n], h)) for n in ("query", "key", "value"))
  att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads), axis=-1)
  x = x + _dense(layer["attn"]["out"], (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d))
  return x + _dense(layer["ff2"], _gelu(_dense(layer["ff1"], _layer_norm(layer["norm2"], x))))


def apply_encoder(params, tokens, heads):
  x = params["token"]["embedding"][tokens] + params["position"]["embedding"][: tokens.shape[1]][None]
  if isinstance(params["layers"], dict):  # stacked layers: one scan over the layer axis
    x, _ = jax.lax.scan(lambda x, layer: (_encoder_layer(layer, x, heads), None), x, params["layers"])
  else:
    for layer in params["layers"]:
      x = _encoder_layer(layer, x, heads)
  return _dense(params["head"], _layer_norm(params["final_norm"], x).mean(axis=1))


def stack_layers(params):
  """The encoder with its list of layers stacked into one dict of arrays
  (layer axis first), keeping the creation order of every dict."""

  def stack(layers):
    if isinstance(layers[0], dict):
      return {k: stack([layer[k] for layer in layers]) for k in layers[0]}
    return jnp.stack(layers)

  return {k: stack(v) if k == "layers" else v for k, v in params.items()}


# -- tasks --------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
  name: str
  kind: str  # "regression" or "classification"
  make_data: Callable
  init_student: Callable
  apply: Callable
  epochs: int = 10
  updates_per_epoch: int = 16
  batch: int = 256
  heads: int | None = None
  stacked_modules: dict | None = None


def _noisy_labels(rng, labels, fraction, n_classes):
  labels = labels.copy()
  flip = rng.random(len(labels)) < fraction
  labels[flip] = rng.integers(0, n_classes, flip.sum())
  return labels


def _split(x, y, n_train):
  return {"x_train": x[:n_train], "y_train": y[:n_train], "x_val": x[n_train:], "y_val": y[n_train:]}


def _regression_data(seed, quick=False):
  n_train, n_val = (256, 128) if quick else (4096, 1024)
  teacher = init_mlp(jax.random.key(10_000 + seed), 48, 96, 6, 5, block_norm=False, final_norm=False)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n_train + n_val, 48)).astype(np.float32)
  y = np.asarray(apply_mlp(teacher, jnp.asarray(x))) + 0.10 * rng.standard_normal((n_train + n_val, 6))
  return _split(jnp.asarray(x), jnp.asarray(y, jnp.float32), n_train)


def _classification_data(seed, quick=False):
  n_train, n_val = (256, 128) if quick else (4096, 1024)
  teacher = init_mlp(jax.random.key(20_000 + seed), 64, 96, 6, 5, block_norm=True, final_norm=True)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n_train + n_val, 64)).astype(np.float32)
  labels = np.array(jnp.argmax(apply_mlp(teacher, jnp.asarray(x)), -1))
  labels[:n_train] = _noisy_labels(rng, labels[:n_train], 0.08, 6)
  return _split(jnp.asarray(x), jnp.asarray(labels), n_train)


def _sequence_data(seed, quick=False):
  n_train, n_val = (160, 96) if quick else (3072, 768)  # quick: the teacher labels one chunk
  teacher = init_encoder(jax.random.key(30_000 + seed), 256, 32, 96, 4, 384, 8)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (n_train + n_val, 32))
  logits = jnp.concatenate([apply_encoder(teacher, jnp.asarray(tokens[i:i + 256]), 4)
                            for i in range(0, len(tokens), 256)])
  labels = np.array(jnp.argmax(logits, -1))
  labels[:n_train] = _noisy_labels(rng, labels[:n_train], 0.06, 8)
  return _split(jnp.asarray(tokens), jnp.asarray(labels), n_train)


def _student_mlp(d_in, d_out, **kw):
  def init(key, quick=False):
    return init_mlp(key, d_in, 32 if quick else 128, d_out, 3 if quick else 10, **kw)
  return init


def _student_encoder(key, quick=False):
  if quick:
    return init_encoder(key, 256, 32, 32, 2, 64, 8)
  return init_encoder(key, 256, 32, 128, 8, 512, 8)


TASKS = {
    "deep_regression": Task("deep_regression", "regression", _regression_data,
                            _student_mlp(48, 6, block_norm=False, final_norm=False), apply_mlp),
    "deep_classification": Task("deep_classification", "classification", _classification_data,
                                _student_mlp(64, 6, block_norm=True, final_norm=True), apply_mlp),
    "tail_norm_classification": Task(
        "tail_norm_classification", "classification", _classification_data,
        _student_mlp(64, 6, block_norm=False, final_norm=True, bridge=True), apply_mlp),
    "sequence_classification": Task("sequence_classification", "classification", _sequence_data,
                                    _student_encoder, None, updates_per_epoch=12, batch=96, heads=8),
    # the same student with its layers stacked and scanned: the same weights,
    # data and batches as its unrolled twin above, so the same curves
    "sequence_classification_scanned": Task(
        "sequence_classification_scanned", "classification", _sequence_data,
        lambda key, quick=False: stack_layers(_student_encoder(key, quick)), None,
        updates_per_epoch=12, batch=96, heads=8, stacked_modules={"layers": 0}),
}
STACKED_CONFIGS = ("STAC default", "STAC full-decay trunk", "STAC wider cap", "AdamW baseline",
                   "STAC 0.1.x momentum")


def forward(task, params, x):
  if task.heads is not None:
    heads = 2 if params["head"]["kernel"].shape[0] == 32 else task.heads
    return apply_encoder(params, x, heads)
  return task.apply(params, x)


def loss_fn(task, params, x, y):
  out = forward(task, params, x)
  if task.kind == "regression":
    return jnp.mean((out - y) ** 2)
  return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()


def make_train_step(task, tx):
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(task, p, x, y))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


def make_eval(task):
  def evaluate(params, x, y):
    out = forward(task, params, x)
    if task.kind == "regression":
      return jnp.mean((out - y) ** 2), jnp.nan
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), jnp.mean(jnp.argmax(out, -1) == y)
  return jax.jit(evaluate)


def batch_schedule(task, seed, n_train, epochs):
  rng = np.random.default_rng(1_000 + seed)
  return [rng.integers(0, n_train, (task.updates_per_epoch, task.batch)) for _ in range(epochs)]


@functools.cache
def student_optimizers(task_name: str, *, quick: bool) -> tuple[dict, dict]:
  """A task's student (seed 0) and ``common.optimizers`` for it, built once per process."""
  task = TASKS[task_name]
  template = task.init_student(jax.random.key(0), quick=quick)
  return template, common.optimizers(template, stacked_modules=task.stacked_modules)


@functools.cache
def train_step(task_name: str, config: str, *, quick: bool) -> tuple[optax.GradientTransformation, Callable]:
  """The transformation ``config`` for a task's student and its jitted train step
  ``step(params, state, x, y) -> (params, state, loss)`` (params and state
  donated), built once per process: every seed, and every caller with the
  same shapes, reuses one compile."""
  task = TASKS[task_name]
  tx = student_optimizers(task_name, quick=quick)[1][config]()
  return tx, jax.jit(make_train_step(task, tx), donate_argnums=(0, 1))


# -- PyTorch side ------------------------------------------------------------------


def torch_run(task, params0, data, schedule, config):
  """PyTorch STAC default or AdamW on the same weights, data and batches."""
  import stac_optimizer  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  def build(tree):
    if isinstance(tree, list):
      return nn.ModuleList(build(t) for t in tree)
    if "kernel" in tree:
      m = nn.Linear(*tree["kernel"].shape)
      m.weight.data = torch.from_numpy(np.array(tree["kernel"]).T.copy())
      m.bias.data = torch.from_numpy(np.array(tree["bias"]).copy())
      return m
    if "scale" in tree:
      m = nn.LayerNorm(tree["scale"].shape[0], eps=LN_EPS)
      m.weight.data = torch.from_numpy(np.array(tree["scale"]).copy())
      m.bias.data = torch.from_numpy(np.array(tree["bias"]).copy())
      return m
    if "embedding" in tree:
      m = nn.Embedding(*tree["embedding"].shape)
      m.weight.data = torch.from_numpy(np.array(tree["embedding"]).copy())
      return m
    return nn.ModuleDict({k: build(v) for k, v in tree.items()})

  model = build(params0)
  gelu = nn.functional.gelu

  def fwd(x):
    if task.heads is not None:
      heads = 2 if params0["head"]["kernel"].shape[0] == 32 else task.heads
      h = model["token"](x) + model["position"](torch.arange(x.shape[1]))[None]
      b, t, d = h.shape
      for layer in model["layers"]:
        z = layer["norm1"](h)
        q, k, v = (layer["attn"][n](z).view(b, t, heads, d // heads).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(d // heads), dim=-1)
        h = h + layer["attn"]["out"]((att @ v).transpose(1, 2).reshape(b, t, d))
        h = h + layer["ff2"](gelu(layer["ff1"](layer["norm2"](h))))
      return model["head"](model["final_norm"](h).mean(dim=1))
    h = model["stem"](x)
    for block in model["blocks"]:
      z = block["fc2"](gelu(block["fc1"](h)))
      h = h + (block["norm"](z) if "norm" in block else z)
    if "bridge" in model:
      h = model["bridge"](h)
    if "final_norm" in model:
      h = model["final_norm"](h)
    return model["head"](h)

  if config == "PyTorch STAC default":
    opt = stac_optimizer.STAC(model, lr=common.LR, weight_decay=common.WD)
  else:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith("bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": common.WD},
                             {"params": no_decay, "weight_decay": 0.0}], lr=common.LR)

  def loss_of(out, y):
    if task.kind == "regression":
      return torch.mean((out - y) ** 2)
    return nn.functional.cross_entropy(out, y)

  x_tr, y_tr, x_val, y_val = (torch.from_numpy(np.array(data[k]))
                              for k in ("x_train", "y_train", "x_val", "y_val"))
  if task.kind == "classification":
    y_tr, y_val = y_tr.long(), y_val.long()
  if task.heads is not None:
    x_tr, x_val = x_tr.long(), x_val.long()
  curve = []
  for epoch_batches in schedule:
    for idx in epoch_batches:
      idx = torch.from_numpy(idx)
      opt.zero_grad()
      loss_of(fwd(x_tr[idx]), y_tr[idx]).backward()
      opt.step()
    with torch.no_grad():
      out = fwd(x_val)
      acc = float((out.argmax(-1) == y_val).float().mean()) if task.kind == "classification" else float("nan")
      curve.append({"val_loss": float(loss_of(out, y_val)), "val_acc": acc})
  return curve


# -- the benchmark --------------------------------------------------------------------


def run_task(task, configs, seeds, epochs, quick, with_torch):
  if task.stacked_modules is not None:  # the STAC configs and their AdamW baseline
    configs = [c for c in configs if c in STACKED_CONFIGS]
    with_torch = False  # PyTorch's side is the unrolled twin's task
  results = {name: [] for name in configs}
  if with_torch:
    results.update({"PyTorch STAC default": [], "PyTorch AdamW": []})
  evaluate = make_eval(task)
  template, _ = student_optimizers(task.name, quick=quick)
  states_mib = {}
  steps = {}
  for name in configs:  # one transformation and one compiled step per config, reused across seeds
    tx, _ = steps[name] = train_step(task.name, name, quick=quick)
    states_mib[name] = common.state_bytes(tx.init(template)) / 2**20
  total = len(seeds) * len(results)
  done = 0
  for seed in seeds:
    data = task.make_data(seed, quick=quick)
    params0 = task.init_student(jax.random.key(500 + seed), quick=quick)
    schedule = batch_schedule(task, seed, data["x_train"].shape[0], epochs)
    for name in configs:
      tx, step = steps[name]
      params, state = jax.tree.map(jnp.copy, params0), tx.init(params0)
      curve = []
      for epoch_batches in schedule:
        for idx in epoch_batches:
          params, state, _ = step(params, state, data["x_train"][idx], data["y_train"][idx])
        val_loss, val_acc = evaluate(params, data["x_val"], data["y_val"])
        curve.append({"val_loss": float(val_loss), "val_acc": float(val_acc)})
      results[name].append(curve)
      done += 1
      common.progress(f"research {task.name}", done, total)
    if with_torch:
      for name in ("PyTorch STAC default", "PyTorch AdamW"):
        results[name].append(torch_run(task, params0, data, schedule, name))
        done += 1
        common.progress(f"research {task.name}", done, total)
  summary = {}
  metric = "val_loss" if task.kind == "regression" else "val_acc"
  for name, curves in results.items():
    finals = [c[-1][metric] for c in curves]
    summary[name] = {
        "metric": metric,
        "final_mean": float(np.mean(finals)),
        "final_min": float(np.min(finals)),
        "final_max": float(np.max(finals)),
        "final_per_seed": finals,
        "final_val_loss_mean": float(np.mean([c[-1]["val_loss"] for c in curves])),
        "curve_mean": [float(np.mean([c[e][metric] for c in curves])) for e in range(len(curves[0]))],
        "state_mib": states_mib.get(name),
    }
  return summary


def main(argv=None):
  parser = common.cli(__doc__.splitlines()[0], "tiny models and data, one seed, 2 epochs, PyTorch on one thread")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--tasks", default=",".join(TASKS))
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--configs", default=None,
                      help="comma-separated subset of the JAX configs (default: all of them)")
  args = parser.parse_args(argv)
  all_configs = list(common.optimizers(TASKS["deep_regression"].init_student(jax.random.key(0), quick=True)))
  configs = all_configs if args.configs is None else [c.strip() for c in args.configs.split(",")]
  unknown = [c for c in configs if c not in all_configs]
  if unknown or not configs:
    parser.error(f"--configs: unknown {unknown or configs}; allowed: {', '.join(all_configs)}")
  unknown = [t for t in args.tasks.split(",") if t not in TASKS]
  if unknown:
    parser.error(f"--tasks: unknown {unknown}; allowed: {', '.join(TASKS)}")
  common.select_device(args.device)
  seeds = [0] if args.quick else list(range(args.seeds))
  epochs = 2 if args.quick else args.epochs
  with_torch = not args.no_torch
  if with_torch:
    try:
      import stac_optimizer  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      with_torch = False
  start = time.time()
  report = {"benchmark": "research", "quick": args.quick, "environment": common.environment(),
            "seeds": seeds, "epochs": epochs, "lr": common.LR, "weight_decay": common.WD,
            "configs": configs, "torch_side_by_side": with_torch, "tasks": {}}
  for name in args.tasks.split(","):
    task = TASKS[name]
    with common.torch_threads(1 if args.quick else None):
      report["tasks"][name] = run_task(task, configs, seeds, epochs, args.quick, with_torch)
    print(f"\n{name}:")
    for config, s in report["tasks"][name].items():
      state = f"{s['state_mib']:8.3f} MiB" if s["state_mib"] is not None else "        -   "
      print(f"  {config:<24} {s['metric']} {s['final_mean']:.4f} [{s['final_min']:.4f}, {s['final_max']:.4f}]  state {state}")
  report["seconds"] = time.time() - start
  return common.finish(report, args, plot)


def plot(report, path):
  plt = common.plt()
  tasks = list(report["tasks"])
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
  for ax, task in zip(axes[0], tasks, strict=True):
    for config, s in report["tasks"][task].items():
      style = "--" if config.startswith("PyTorch") else "-"
      ax.plot(range(1, len(s["curve_mean"]) + 1), s["curve_mean"], style, label=config)
    metric = next(iter(report["tasks"][task].values()))["metric"]
    ax.set(title=task.replace("_", " "), xlabel="epoch", ylabel=f"mean {metric}")
    if metric == "val_loss":
      ax.set_yscale("log")
  axes[0][0].legend(fontsize=6)
  fig.suptitle(f"research benchmark, {len(report['seeds'])} seeds, {report['environment']['device_kind']}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
