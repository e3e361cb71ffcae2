"""The README's Python examples run as written, train visibly, and print what the README shows.

README.pypi.md (the package index's description), README.ko.md and the documentation site's
front page show the same code, checked here to be the README's own blocks, so that running
README.md's blocks runs theirs.
"""

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LOSS = re.compile(r"^(\S+) +loss ([0-9.]+) -> ([0-9.]+) after (\d+) steps$", re.M)


def python_blocks(text):
  return re.findall(r"```python\n(.*?)```", text, re.S)


def examples(text):
  """Each ```python block, with the ```text block that follows it (what it printed), if the
  next fenced block is one."""
  found = []
  for block in re.finditer(r"```python\n(.*?)```", text, re.S):
    after = re.search(r"```(\w*)\n(.*?)```", text[block.end():], re.S)
    found.append((block.group(1), after.group(2) if after and after.group(1) == "text" else ""))
  return found


EXAMPLES = examples(README)


def run(code, name):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, name, "exec"), {"__name__": name})  # noqa: S102
  return out.getvalue()


def test_the_readme_has_its_examples():
  assert len(EXAMPLES) >= 2
  assert all(shown for _, shown in EXAMPLES[:2]), "the quickstarts show what they print"


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs_as_written_and_trains_visibly(index):
  code, shown = EXAMPLES[index]
  printed = run(code, f"README.md block {index}")
  # every "# STACPartition(...)" comment in the block is a line the block prints
  for expected in re.findall(r"^# (STACPartition\(.*\))$", code, re.M):
    assert expected in printed, printed
  losses = {name: (float(a), float(b)) for name, a, b, _ in LOSS.findall(printed)}
  if "loss" in code:
    assert set(losses) == {"STAC", "AdamW"}, printed  # STAC next to optax.adamw, same lines
    before, after = losses["STAC"]
    assert after <= 0.1 * before, f"STAC's loss should fall at least 10x: {printed}"
    assert losses["AdamW"][1] < losses["AdamW"][0]
  if shown:
    # the README shows this code's output: the same lines, the same numbers to a few percent
    # (another JAX version or CPU may change the last digits)
    shown_losses = {name: (float(a), float(b)) for name, a, b, _ in LOSS.findall(shown)}
    assert shown_losses.keys() == losses.keys(), (shown, printed)
    for name, (a, b) in shown_losses.items():
      assert losses[name][0] == pytest.approx(a, rel=0.02), (name, shown, printed)
      assert losses[name][1] == pytest.approx(b, rel=0.25), (name, shown, printed)
    partitions = [line for line in shown.splitlines() if line.startswith("STACPartition(")]
    assert all(line in printed for line in partitions), (shown, printed)


@pytest.mark.parametrize("other", ["README.pypi.md", "README.ko.md", "docs/index.md"])
def test_the_other_readmes_show_the_readmes_own_code(other):
  blocks = python_blocks((ROOT / other).read_text())
  assert blocks, f"{other} shows the quickstart"
  mine = [code for code, _ in EXAMPLES]
  for block in blocks:
    assert block in mine, f"a code block of {other} is not one of README.md's (keep them in step)"


def test_the_package_index_description_has_only_absolute_links():
  text = (ROOT / "README.pypi.md").read_text()
  links = re.findall(r"\]\(([^)]+)\)", text)
  assert all(link.startswith("https://") for link in links), links
  assert text.index("pip install stac-optax") < text.index("```python")
