"""The README's Python examples run as written, and print what the README shows."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_examples():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_as_written(index):
  code = BLOCKS[index]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": f"readme_{index}"})  # noqa: S102
  printed = out.getvalue()
  # every "# STACPartition(...)" comment in the block is a line the block prints
  for expected in re.findall(r"^# (STACPartition\(.*\))$", code, re.M):
    assert expected in printed, printed
  losses = re.search(r"loss ([0-9.]+) -> ([0-9.]+)", printed)
  if losses:
    assert float(losses.group(2)) < float(losses.group(1))
