"""The Python examples of docs/forms.md run as written and print what they say."""

import contextlib
import io
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "forms.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_page_has_its_examples():
  assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_forms_example_runs_as_written(index):
  code = BLOCKS[index]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, f"docs/forms.md block {index}", "exec"), {"__name__": f"forms_{index}"})  # noqa: S102
  printed = out.getvalue().splitlines()
  # "print(...)  # shown: why" lines: the block prints "shown", in order
  shown = [c.split(":")[0].strip() for c in re.findall(r"^\s*print\(.*\)\s+#\s*(.*)$", code, re.M)]
  assert len(printed) >= len(shown), printed
  for want, got in zip(shown, printed, strict=False):
    assert got == want, (got, want)
