"""Which parameters each section holds: the split stac-optimizer makes of a
PyTorch module, a state dict's groups checked against it, and against the
split stac_optax finds for the Flax side.

Messages name a parameter by its PyTorch name and its Flax path(s)
(:class:`Names`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stac_optax import STACPartition
from stac_optax._tree import ROOT
from stac_optax.labels import SECTION_NAMES
from stac_optax.torch_interop.layouts import ParameterMatch
from stac_optax.torch_interop.state_dict import Groups, group_label

ORDER_FIX = (
    "stac_optax counts the Flax modules in the registration order it reads "
    "from the model; where that is not the order of PyTorch's named_modules() "
    "(an __init__ that assigns them in another order, a model written "
    "differently), give module_order= with every counted Flax module in "
    "PyTorch's order"
)


def torch_split(torch_module: Any, n_cap: int) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
  """The module's counted modules, split the way stac-optimizer splits them:
  ``{"sign": [(module, parameter names)], "adamw": [...]}``."""
  seen, modules = set(), []
  for module_name, module in torch_module.named_modules():
    names = []
    for name, param in module.named_parameters(recurse=False):
      if not param.requires_grad or id(param) in seen:
        continue
      seen.add(id(param))
      names.append(f"{module_name}.{name}" if module_name else name)
    if names:
      modules.append((module_name or ROOT, tuple(names)))
  split = len(modules) - min(n_cap, len(modules))
  return {"sign": modules[:split], "adamw": modules[split:]}


def by_torch_name(matches: Sequence[ParameterMatch]) -> dict[str, list[ParameterMatch]]:
  """``{torch_name: [matches]}``: one match, or one per block of rows of a
  fused parameter."""
  out: dict[str, list[ParameterMatch]] = {}
  for m in matches:
    out.setdefault(m.torch_name, []).append(m)
  return out


class Names:
  """How messages name a parameter: its PyTorch name and Flax path(s)."""

  def __init__(self, matches: Sequence[ParameterMatch]):
    self.flax = {t: [m.flax_name for m in ms] for t, ms in by_torch_name(matches).items()}

  def __call__(self, torch_name: str) -> str:
    if torch_name in self.flax:
      return f"{torch_name!r} (Flax {', '.join(map(repr, self.flax[torch_name]))})"
    return repr(torch_name)

  def many(self, torch_names: Sequence[str]) -> str:
    return "[" + ", ".join(self(n) for n in torch_names) + "]"


def check_names(by_role: Groups, torch_module: Any, names: Names) -> None:
  """The groups' ``param_names`` are the module's split, in order."""
  params = dict(torch_module.named_parameters())
  for role, (i, group) in by_role.items():
    _check_listed(group_label(i, role), group, params, names)
  _check_split(by_role, torch_module, names)


def _check_listed(where: str, group: Mapping, params: Mapping[str, Any], names: Names) -> None:
  """A group lists trained parameters of the module, each once, with an
  index each."""
  listed, indices = group["param_names"], group["params"]
  for key, value in (("param_names", listed), ("params", indices)):
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
      raise ValueError(f"{where}: {key!r} must be a list, found {value!r}.")
  if len(listed) != len(indices):
    raise ValueError(
        f"{where} lists {len(indices)} parameter indices under 'params' but "
        f"{len(listed)} names under 'param_names'."
    )
  unknown = [n for n in listed if not isinstance(n, str) or n not in params]
  if unknown:
    raise ValueError(
        f"{where} names parameters that torch_module does not have: {unknown}; the "
        "state was saved from another model. torch_module's parameters: "
        f"{list(params)}."
    )
  frozen = [n for n in listed if not params[n].requires_grad]
  if frozen:
    raise ValueError(
        f"{where} holds {names.many(frozen)}, frozen in torch_module "
        "(requires_grad=False); STAC trains no frozen parameter."
    )
  twice = sorted({n for n in listed if list(listed).count(n) > 1})
  if twice:
    raise ValueError(f"{where} lists {names.many(twice)} more than once.")


def _check_split(by_role: Groups, torch_module: Any, names: Names) -> None:
  """The groups hold what stac-optimizer puts in each section of the module
  with the saved cap size."""
  n_cap = int(next(iter(by_role.values()))[1]["resolved_last_n_modules"])
  split = torch_split(torch_module, n_cap)
  count = len(split["sign"]) + len(split["adamw"])
  if n_cap > count:
    raise ValueError(
        f"the state dict's resolved_last_n_modules is {n_cap} but torch_module has "
        f"{count} counted modules; the state was saved for another model."
    )
  saved_roles = [role for role, _ in sorted(by_role.items(), key=lambda kv: kv[1][0])]
  roles = [role for role in ("sign", "adamw") if split[role]]
  if saved_roles != roles:
    raise ValueError(
        f"the state dict has the sections {saved_roles} but stac-optimizer splits "
        f"torch_module into {roles} with last_n_modules={n_cap} ({count} counted "
        "modules); the state was saved for another split."
    )
  for role in roles:
    i, group = by_role[role]
    want = tuple(n for _, ns in split[role] for n in ns)
    got = tuple(group["param_names"])
    if got != want:
      missing = [n for n in want if n not in got]
      extra = [n for n in got if n not in want]
      detail = "; ".join(
          [f"missing {names.many(missing)}"] * bool(missing)
          + [f"not expected there {names.many(extra)}"] * bool(extra)
      ) or f"the same parameters in another order: {list(got)} vs {list(want)}"
      raise ValueError(
          f"{group_label(i, role)} does not hold the parameters stac-optimizer puts in "
          f"the {SECTION_NAMES[role]} of torch_module with last_n_modules={n_cap}: {detail}."
      )
    modules = tuple(m for m, _ in split[role])
    saved_modules = tuple(group.get("module_names", ()))
    if saved_modules and saved_modules != modules:
      raise ValueError(
          f"{group_label(i, role)} was saved for the modules {list(saved_modules)}; "
          f"torch_module's {SECTION_NAMES[role]} is {list(modules)}."
      )


def check_optimizer_trains(optimizer: Any, torch_module: Any, names: Names) -> None:
  """The optimizer's parameters are ``torch_module``'s, not a copy's."""
  params = dict(torch_module.named_parameters())
  for i, group in enumerate(optimizer.param_groups):
    for name, param in zip(group.get("param_names", ()), group["params"], strict=False):
      if params.get(name) is not param:
        raise ValueError(
            f"the optimizer's param group {i} holds a tensor under the name {name!r} that "
            f"is not torch_module's parameter {names(name)}: the STAC was built on "
            "another module (or a copy). Pass the module it trains."
        )


def check_same_split(
    torch_groups: Groups, partition: STACPartition, matches: Sequence[ParameterMatch]
) -> None:
  """Each section holds the same parameters in PyTorch and in ``partition``."""
  owner_name = partition.owner
  owner = {t: {owner_name(m.flax_name) for m in ms} for t, ms in by_torch_name(matches).items()}
  torch_of = {f: t for t, fs in owner.items() for f in fs}
  flax_name_of = {t: sorted(fs)[0] for t, fs in owner.items() if fs}
  for role, flax_names in (
      ("sign", partition.sign_parameter_names),
      ("adamw", partition.adamw_parameter_names),
  ):
    group = torch_groups.get(role)
    torch_names = tuple(group[1]["param_names"]) if group is not None else ()
    mapped = {f for n in torch_names for f in owner[n]}
    if mapped != set(flax_names):
      only_torch = list(dict.fromkeys(torch_of[f] for n in torch_names for f in sorted(owner[n])
                                      if f not in set(flax_names)))
      only_flax = list(dict.fromkeys(torch_of[f] for f in flax_names if f not in mapped))
      raise ValueError(
          f"the PyTorch and stac_optax partitions differ in the {role} section "
          f"(the {SECTION_NAMES[role]}), "
          + split_difference(only_torch, only_flax, flax_name_of) + ". " + ORDER_FIX + "."
      )


def split_difference(
    torch_only: Sequence[str], flax_only: Sequence[str], flax_name_of: Mapping[str, str],
    limit: int = 3,
) -> str:
  """The first few modules on each side of a split that differs.

  Args:
    torch_only: PyTorch parameter names in the section in PyTorch only.
    flax_only: PyTorch parameter names in the section in stac_optax only.
    flax_name_of: PyTorch parameter name -> its Flax path.
    limit: how many modules to name on each side.

  Returns:
    One sentence, e.g. ``in PyTorch only: 'blocks.2.gate' (Flax
    'blocks_2/gate'); in stac_optax only: 'blocks.2.out' (Flax
    'blocks_2/out')``; each side ends with how many more it holds.
  """
  def modules(torch_names: Sequence[str]) -> str:
    found = dict.fromkeys(
        (n.rpartition(".")[0] or ROOT,
         flax_name_of.get(n, "").rpartition("/")[0] or ROOT)
        for n in torch_names
    )
    shown = ", ".join(f"{t!r} (Flax {f!r})" for t, f in list(found)[:limit])
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return (shown + more) or "none"

  return f"in PyTorch only: {modules(torch_only)}; in stac_optax only: {modules(flax_only)}"
