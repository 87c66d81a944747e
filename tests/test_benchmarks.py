"""The benchmark scripts' own plumbing (their timings are not run in the tests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_hessian_writes_its_json_atomically(tmp_path, monkeypatch, capsys):
    """--json went through Path.write_text: a reader could see half a file."""
    bench = load("bench_hessian")
    monkeypatch.setattr(bench, "run", lambda args: {"tiny": {"repeats": 1}})
    monkeypatch.setattr(bench, "markdown", lambda *args: "table")
    written = []
    atomic = bench.write_text
    monkeypatch.setattr(bench, "write_text", lambda p, text: written.append(p) or atomic(p, text))
    out = tmp_path / "runs" / "hessian.json"
    bench.main(["--json", str(out)])
    assert written == [out] and list(out.parent.iterdir()) == [out]
    assert json.loads(out.read_text())["results"] == {"tiny": {"repeats": 1}}
    assert capsys.readouterr().out == "table\n"
