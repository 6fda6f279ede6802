"""The README's quick tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_tour_runs() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
