"""Every Python example in README.md runs as written (in a scratch directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
JSON_EXAMPLES = re.findall(r"```json\n(.*?)```", README.read_text(), re.S)


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


def test_the_json_partition_example_loads_round_trips_and_is_in_model_order(tmp_path):
    """The file-format example is a valid excerpt of the partition of the model it names."""
    import partition
    from lab.models import TinyGPT, TinyGPTConfig

    (text,) = JSON_EXAMPLES
    path = tmp_path / "example.json"
    path.write_text(text)
    part = partition.Partition.from_json(path)
    part.to_json(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text  # the writer's exact layout
    # provenance "model": "tiny.json", a TinyGPTConfig with these sizes
    model = TinyGPT(TinyGPTConfig(vocab_size=16, context=8, n_layer=1, d_model=8, n_heads=2))
    full = partition.adam_mini(model)
    order = [name for name, _ in model.named_parameters()]
    assert list(part.names) == sorted(part.names, key=order.index)  # "tensors is in model order"
    for name in part.names:
        assert part[name] == full[name]
    assert {k: part.provenance[k] for k in full.provenance} == full.provenance


def test_every_make_target_is_in_the_readme():
    """Each target of the Makefile's .PHONY line is named as `make TARGET` in README.md."""
    makefile = (README.parent / "Makefile").read_text()
    (phony,) = re.findall(r"^\.PHONY:(.*)$", makefile, re.M)
    text = README.read_text()
    missing = [t for t in phony.split() if f"`make {t}`" not in text and f"make {t} " not in text]
    assert not missing, f"targets not in README.md: {missing}"
