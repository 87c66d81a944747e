"""Every Python example in README.md runs as written (in a scratch directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_its_three_examples():
    assert len(EXAMPLES) == 3


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the partition example writes partition.json
    namespace: dict = {}
    exec(compile(EXAMPLES[index], f"README.md example {index + 1}", "exec"), namespace)
    if index == 0:
        assert (tmp_path / "partition.json").exists()
        assert (
            namespace["part"].num_blocks
            < namespace["partition"].by_rows(namespace["model"]).num_blocks
        )
    if index == 1:
        assert namespace["D"].shape == namespace["H"].shape
        assert (namespace["Hv"] - namespace["D"] @ namespace["v"]).abs().max() < 1e-10
    if index == 2:
        assert int(namespace["opt"].state[namespace["model"].lm_head.weight]["step"]) == 1
