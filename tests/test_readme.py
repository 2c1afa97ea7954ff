"""Every ```python block of README.md runs as written (after the README's first command: here a tiny model
stands in for the demo's export at runs/demo/model), so the examples cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .builders import tiny_vlm

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny_vlm(top_k=2).save_pretrained(tmp_path / "runs" / "demo" / "model")
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # every block prints what it shows
