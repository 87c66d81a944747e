"""``lab.memory``'s rows and markdown columns (the Llama 2-7B figures: test_optimizer_memory)."""

from __future__ import annotations

from lab import memory


def _cells(table: str) -> list[dict[str, str]]:
    header, _, *lines = table.splitlines()

    def split(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    return [dict(zip(split(header), split(line), strict=True)) for line in lines]


def test_bf16_momentum_saves_two_bytes_per_parameter():
    [row] = memory.memory_rows(["gpt2"])
    assert row.adam_mini - row.adam_mini_bf16 == 2 * row.num_params
    assert row.adamw - row.adam_mini == 4 * (row.num_params - row.num_blocks)


def test_every_column_shows_its_own_number():
    rows = [
        memory.MemoryRow("Llama 2-7B", 6_738_415_616, 1_234_567, 53_907_324_928,
                         26_958_598_000, 13_481_766_768),
        memory.MemoryRow("tinygpt", 2_000_000, 4_321, 16_000_000, 8_017_284, 4_017_284),
    ]  # fmt: skip
    llama, tiny = _cells(memory.markdown(rows))
    assert llama == {
        "model": "Llama 2-7B",
        "params": "6,738.4M",
        "v entries (Adam-mini)": "1,234,567",
        "AdamW state (GB)": "53.91",
        "Adam-mini state (GB)": "26.96",
        "Adam-mini / AdamW": f"{26_958_598_000 / 53_907_324_928:.2%}",
        "Adam-mini + bf16 m (GB)": "13.48",
        "paper AdamW (GB)": "53.92",
        "paper Adam-mini (GB)": "26.96",
    }
    assert tiny["v entries (Adam-mini)"] == "4,321"
    assert tiny["paper AdamW (GB)"] == tiny["paper Adam-mini (GB)"] == "—"
