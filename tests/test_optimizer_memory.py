"""``adam-mini-lab memory``: the table against the paper's Llama 2-7B figures."""

from __future__ import annotations

import argparse

import pytest
import torch

import optimizer
from lab import memory, partition_cli
from lab.cli import main


def test_memory_command_matches_paper_llama2_7b(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    memory.add_parser(parser.add_subparsers())
    out = tmp_path / "mem.md"
    args = parser.parse_args(["memory", "--models", "GPT-2 125M", "Llama 2-7B", "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert out.read_text() in printed
    rows = {r.model: r for r in memory.memory_rows(["Llama 2-7B"])}
    llama = rows["Llama 2-7B"]
    adamw, mini = memory.PAPER["Llama 2-7B"]
    assert llama.adamw / memory.GB == pytest.approx(adamw, rel=1e-3)
    assert llama.adam_mini / memory.GB == pytest.approx(mini, rel=1e-3)
    assert llama.ratio <= 0.501
    assert "| Llama 2-7B | 6,738.4M |" in printed and "| 53.91 | 26.96 |" in printed


def test_unknown_model_is_named_and_aliases_are_the_partition_presets():
    with pytest.raises(ValueError, match="'GPT-3'; choose from tinygpt, mlp, gpt2, gpt2-medium"):
        memory.memory_rows(["GPT-3"])
    [row] = memory.memory_rows(["gpt2-medium"])
    assert row.model == "GPT-2 355M" and row.num_params == 354_823_168


@pytest.mark.parametrize("name", list(memory.MODELS))
def test_every_table_model_is_a_partition_preset_with_the_same_blocks(name, tmp_path, capsys):
    """`partition --model P` builds the model that `memory --models P` counts (one preset list)."""
    preset = memory.MODELS[name]
    out = tmp_path / "part.json"
    assert main(["partition", "--model", preset, "--out", str(out)]) == 0, capsys.readouterr().err
    [row] = memory.memory_rows([preset])
    assert row.model == name
    assert partition_cli.Partition.from_json(out).num_blocks == row.num_blocks


def test_memory_takes_every_partition_preset():
    parser = argparse.ArgumentParser()
    memory.add_parser(parser.add_subparsers())
    args = parser.parse_args(["memory", "--models", *partition_cli.PRESETS])
    rows = memory.memory_rows(args.models)
    assert len(rows) == len(partition_cli.PRESETS)
    assert all(0 < r.num_blocks < r.num_params and r.adam_mini < r.adamw for r in rows)


def test_state_bytes_names_what_is_not_a_model_and_a_model_with_nothing_to_train():
    with pytest.raises(TypeError, match="takes a module or its named_parameters.., got str"):
        optimizer.state_bytes("gpt2")
    with pytest.raises(TypeError, match=r"\(name, tensor\) pairs"):
        optimizer.state_bytes([torch.zeros(2)])
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):  # was a ZeroDivisionError
        optimizer.state_bytes(frozen)


def test_memory_refuses_an_unusable_out_before_counting(tmp_path, capsys, monkeypatch):
    """The table was counted and printed, then the write failed without naming --out."""
    monkeypatch.setattr(memory, "memory_rows", lambda names: pytest.fail("counted anyway"))
    assert main(["memory", "--models", "mlp", "--out", str(tmp_path)]) == 1
    assert "--out" in capsys.readouterr().err
