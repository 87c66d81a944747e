"""The notebooks execute top to bottom in quick mode, and are stored without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def test_there_are_at_least_three_notebooks() -> None:
    assert {
        "01_hessian_explorer.ipynb",
        "02_derive_partition.ipynb",
        "03_train_adam_mini.ipynb",
    } <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_stripped(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: run nbstripout"
    assert "ADAM_MINI_LAB_QUICK" in "".join(c.source for c in nb.cells)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """One output folder for all notebooks, so 03 trains on the partition 02 exported."""
    return tmp_path_factory.mktemp("notebook_out")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_executes_in_quick_mode(name: str, out_dir: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADAM_MINI_LAB_QUICK", "1")
    monkeypatch.setenv("ADAM_MINI_LAB_OUT", str(out_dir))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    nbformat.write(nb, tmp_path / name)  # the executed copy goes to tmp only
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    if name.startswith("02"):
        assert (out_dir / "partition.json").exists()
