"""The ``adam-mini-lab partition`` subcommand (built on a private parser: lab.cli is the lead's)."""

import argparse
import json
import re

import pytest
import torch

from lab import partition_cli
from partition import Partition


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="adam-mini-lab")
    partition_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["partition", *argv])
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_llama2_7b_preset_round_trips_through_show(tmp_path, capsys):
    pytest.importorskip("transformers")
    path = tmp_path / "llama.json"
    code, out, _ = run(["--model", "llama2-7b", "--rule", "adam-mini", "--out", str(path)], capsys)
    assert code == 0 and "wrote" in out
    part = Partition.from_json(path)
    assert part.num_blocks / part.num_params <= 0.0002
    assert part.provenance["model"] == "llama2-7b" and part.provenance["method"] == "adam_mini"
    code, shown, _ = run(["show", str(path)], capsys)
    assert code == 0
    assert shown.strip() == part.summary().strip()
    assert "model.layers.31.self_attn.q_proj.weight" in shown and "heads(128)" in shown


def test_config_files_transformers_and_tinygpt(tmp_path, capsys):
    pytest.importorskip("transformers")
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "intermediate_size": 40, "vocab_size": 50}))  # fmt: skip
    code, out, _ = run(["--model", str(bert), "--rule", "rows"], capsys)
    assert code == 0 and "bert.encoder.layer.0.attention.self.query.weight" in out
    tiny = tmp_path / "tiny.json"
    tiny.write_text(
        json.dumps({"vocab_size": 16, "context": 8, "n_layer": 1, "d_model": 8, "n_heads": 2})
    )
    out_path = tmp_path / "t.json"
    code, out, _ = run(["--model", str(tiny), "--rule", "tensor", "--out", str(out_path)], capsys)
    assert code == 0
    part = Partition.from_json(out_path)
    assert part.num_blocks == len(part) == 15


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-such-model"], "neither a preset"),
        (
            ["--model", "tinygpt", "--rule", "adam-mini", "--n-heads", "3"],
            "not a multiple of 3 heads",
        ),
        ([], "--model is required"),
        (["--model", "tinygpt", "--rule", "rows", "--n-heads", "4"], "only shape --rule adam-mini"),
        (
            ["--model", "tinygpt", "--exact", "--method", "spectral", "--seed", "5"],
            "--method, --exact, --seed only shape --rule derived",
        ),
        (["--model", "mlp", "--rule", "derived", "--threshold", "2"], "--threshold must be in"),
        (["--model", "mlp", "--rule", "derived", "--num-samples", "1"], "--num-samples must be"),
        (["--model", "mlp", "--rule", "derived", "--seed", str(2**64)], "--seed must be an"),
        (
            ["--model", "mlp", "--rule", "derived", "--seed", str(-(2**63) - 1)],
            f"in [-2**63, 2**63), got {-(2**63) - 1}",
        ),
        (["--model", "tinygpt", "show", "x.json"], "it takes only a FILE"),
        (
            ["--model", "tinygpt", "--rule", "derived", "--exact"],
            "this model has 135,808: drop --exact and give --num-samples N",
        ),
    ],
)
def test_errors_are_one_line_messages(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code != 0 and message in err and "Traceback" not in err


@pytest.mark.parametrize("seed", [-1, 2**63 - 1])
def test_derived_takes_every_seed_the_hessian_estimators_take(seed, monkeypatch, capsys):
    """A negative --seed is a seed, as for hessian.block_coupling (and --seed -1 worked before
    the range check): it reaches the measurement."""
    import hessian
    import partition

    hessian.linop.seeded_generator(seed)  # the library takes it
    seen = {}

    def fake_derive(model, args):
        seen["seed"] = args.seed
        return partition.by_rows(model)

    monkeypatch.setattr(partition_cli, "_derive", fake_derive)
    code, _, err = run(["--model", "mlp", "--rule", "derived", "--seed", str(seed)], capsys)
    assert code == 0, err
    assert seen["seed"] == seed


def test_derived_refuses_transformers_models_before_building_them(capsys):
    pytest.importorskip("transformers")
    code, _, err = run(["--model", "llama2-7b", "--rule", "derived"], capsys)
    assert code == 1 and "transformers models are too large" in err


def test_show_rejects_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "adam-mini-lab.partition", "version": 1, "tensors": [')
    code, _, err = run(["show", str(bad)], capsys)
    assert code == 1 and "not valid JSON" in err


def test_config_errors_keep_their_cause_and_refuse_string_booleans(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"d_model": 8, "n_heads": 2, "bias": "false"}))
    code, _, err = run(["--model", str(cfg)], capsys)
    assert code == 1 and "TinyGPTConfig.bias must be true or false, got 'false'" in err
    pytest.importorskip("transformers")
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 65, "num_attention_heads": 4}))
    code, _, err = run(["--model", str(cfg)], capsys)
    assert code == 1 and "hidden size (65) is not a multiple" in err
    assert len(err.strip().splitlines()) == 1
    cfg.write_text(json.dumps({"model_type": "llama", "num_attention_heads": 0}))
    code, _, err = run(["--model", str(cfg)], capsys)
    assert code == 1 and "num_attention_heads must be a positive integer, got 0" in err


def test_a_closed_pipe_ends_quietly():
    """`adam-mini-lab ... | head -1`: the reader leaves early; no error line, exit code 0."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "lab.cli", "partition", "--model", "mlp", "--rule", "rows"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the summary is printed (the model is built first)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_unknown_tinygpt_config_field(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"d_model": 8, "n_head": 2}))
    code, _, err = run(["--model", str(cfg)], capsys)
    assert code == 1 and "no fields ['n_head']" in err


def test_derived_on_a_tiny_mlp_config(tmp_path, capsys, monkeypatch):
    from lab.models import OneHiddenMLP

    monkeypatch.setitem(
        partition_cli.LAB_MODELS, "mlp", lambda: OneHiddenMLP(d=6, m=3, num_classes=4, seed=0)
    )
    out = tmp_path / "d.json"
    argv = ["--model", "mlp", "--rule", "derived", "--exact", "--no-progress", "--out", str(out)]
    code, text, _ = run(argv, capsys)
    assert code == 0
    part = Partition.from_json(out)
    assert part.names == ("fc1.weight", "fc2.weight")
    prov = part.provenance
    assert prov["method"] == "greedy" and prov["exact"] is True and prov["candidate"] == "by_rows"


def test_cli_errors_name_path_and_fix(tmp_path, capsys):
    from lab.cli import main

    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    assert main(["partition", "show", str(empty)]) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "missing key 'format'" in err and "Regenerate" in err
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert main(["reproduce", "--quick", "--out", str(not_a_dir)]) == 1
    assert f"--out {str(not_a_dir)!r}: {str(not_a_dir)!r} is a file, not a folder" in (
        capsys.readouterr().err
    )
    assert main(["memory", "--out", str(tmp_path)]) == 1
    assert "it is a folder; give a file path" in capsys.readouterr().err
    for command in (["memory", "--models", "gpt2"], ["partition", "--model", "mlp"]):
        assert main([*command, "--out", str(not_a_dir / "sub" / "x.json")]) == 1
        assert f"{str(not_a_dir)!r} is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["memory", "--models", "gpt3"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[" * 100000, "is not valid JSON: maximum recursion depth"),
        ('{"d_model": 1' + "0" * 5000 + "}", "is not valid JSON: Exceeds the limit"),
        ('{"d_model": 1' + "0" * 30 + "}", "cannot build TinyGPT"),
    ],
)
def test_config_json_that_cannot_be_read_is_a_one_line_error(tmp_path, capsys, content, match):
    """``--model FILE.json``: deep nesting and huge sizes used to end in a traceback."""
    cfg = tmp_path / "c.json"
    cfg.write_text(content)
    code, _, err = run(["--model", str(cfg)], capsys)
    assert code == 1
    assert f"config file {str(cfg)!r}" in err and re.search(match, err)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("init_std", ["0.02", None, [0.02]])
def test_a_tinygpt_config_field_of_the_wrong_type_is_a_one_line_error(tmp_path, capsys, init_std):
    """TinyGPTConfig compares init_std with 0: a string or null was a bare TypeError."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"d_model": 8, "n_heads": 2, "init_std": init_std}))
    code, _, err = run(["--model", str(cfg)], capsys)
    assert code == 1
    assert f"config file {str(cfg)!r}" in err and "TinyGPTConfig" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "flags", [["--n-heads", "4"], ["--threshold", "0.2", "--no-progress"], ["--rule", "rows"]]
)
def test_show_refuses_the_flags_that_build_a_partition(tmp_path, capsys, flags):
    """``partition --n-heads 4 show FILE`` printed FILE's summary as if the flag had a use."""
    path = tmp_path / "p.json"
    Partition.from_dict({"format": "adam-mini-lab.partition", "version": 1, "provenance": {},
                         "tensors": [], "num_blocks": 0}).to_json(path)  # fmt: skip
    code, out, err = run([*flags, "show", str(path)], capsys)
    assert code == 2 and out == ""
    assert f"it takes only a FILE; drop {flags[0]}" in err


@pytest.mark.parametrize("where", ["folder", "below a file"])
def test_an_out_path_that_cannot_be_written_is_refused_before_the_build(
    where, tmp_path, capsys, monkeypatch
):
    """--rule derived takes minutes (~15 for tinygpt): a bad --out was reported only after."""
    monkeypatch.setattr(partition_cli, "build", lambda args: pytest.fail("the build began"))
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    out = tmp_path if where == "folder" else blocker / "derived.json"
    code, stdout, err = run(["--model", "mlp", "--rule", "derived", "--out", str(out)], capsys)
    assert code == 1 and not stdout
    assert f"--out {str(out)!r}" in err and len(err.strip().splitlines()) == 1
    assert ("give a file path" if where == "folder" else "is a file, not a folder") in err
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize(
    ("rule", "builder"), [("tensor", "by_tensor"), ("rows", "by_rows"), ("elements", "elements")]
)
def test_each_rule_builds_its_partition(rule, builder, tmp_path, capsys):
    import partition

    out = tmp_path / "p.json"
    code, _, err = run(["--model", "mlp", "--rule", rule, "--out", str(out)], capsys)
    assert code == 0, err
    expected = getattr(partition, builder)(partition_cli.load_model("mlp"))
    assert Partition.from_json(out) == expected.with_provenance({"model": "mlp"})


def test_head_flags_reach_the_adam_mini_rules(tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["--model", "tinygpt", "--n-heads", "8", "--head-dim", "8", "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    q = Partition.from_json(out)["blocks.0.attn.q_proj.weight"]
    assert (q.rule, q.params["head_dim"], q.num_blocks) == ("heads", 8, 8)
    # alone, --head-dim 8 contradicts the model's 4 heads of 64 rows
    code, _, err = run(["--model", "tinygpt", "--head-dim", "8"], capsys)
    assert code == 1 and "n_heads=4 x head_dim=8 = 32" in err
    code, _, err = run(["--model", "tinygpt", "--rule", "rows", "--head-dim", "8"], capsys)
    assert code == 1 and "--head-dim only shape --rule adam-mini" in err


def _tiny_mlp(monkeypatch):
    from lab.models import OneHiddenMLP

    monkeypatch.setitem(
        partition_cli.LAB_MODELS, "mlp", lambda: OneHiddenMLP(d=6, m=3, num_classes=4, seed=0)
    )


def test_derived_flags_reach_the_data_the_measurement_and_derive(tmp_path, capsys, monkeypatch):
    import hessian
    import lab.data

    _tiny_mlp(monkeypatch)
    seen = {}
    real_coupling, real_data = hessian.block_coupling, lab.data.gaussian_classification

    def coupling(*args, **kw):
        seen["coupling"] = kw
        return real_coupling(*args, **kw)

    def data(n, d, c, seed, **kw):
        seen["data"] = (n, d, c, seed)
        return real_data(n, d, c, seed, **kw)

    monkeypatch.setattr(hessian, "block_coupling", coupling)
    monkeypatch.setattr(lab.data, "gaussian_classification", data)
    out = tmp_path / "d.json"
    argv = ["--model", "mlp", "--rule", "derived", "--method", "spectral", "--threshold", "0.2",
            "--num-samples", "3", "--seed", "7", "--batch-size", "20", "--no-progress",
            "--out", str(out)]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert seen["data"] == (20, 6, 4, 7)  # at least 4 samples per class: max(20, 16)
    kw = seen["coupling"]
    assert (kw["num_samples"], kw["seed"], kw["exact"], kw["progress"]) == (3, 7, False, False)
    prov = Partition.from_json(out).provenance
    assert (prov["method"], prov["threshold"], prov["num_samples"]) == ("spectral", 0.2, 3)


def test_exact_derivation_ignores_num_samples_and_batch_size_must_be_positive(capsys, monkeypatch):
    _tiny_mlp(monkeypatch)
    argv = ["--model", "mlp", "--rule", "derived", "--exact", "--num-samples", "1", "--no-progress"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    code, _, err = run(["--model", "mlp", "--rule", "derived", "--batch-size", "0"], capsys)
    assert code == 1 and "--batch-size must be >= 1, got 0" in err


def test_derived_on_a_tinygpt_with_a_small_vocabulary_folds_the_bytes(
    tmp_path, capsys, monkeypatch
):
    """The byte corpus has ids up to 255; a TinyGPT with vocab 16 gets them modulo 16."""
    from lab.data import Corpus

    text = torch.tensor(list(range(32, 127)) * 4, dtype=torch.uint8)
    monkeypatch.setattr(Corpus, "stdlib", lambda *a, **k: Corpus(text, 300, source="toy"))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"vocab_size": 16, "context": 4, "n_layer": 1, "d_model": 4,
                               "n_heads": 2, "d_ff": 4}))  # fmt: skip
    out = tmp_path / "d.json"
    argv = ["--model", str(cfg), "--rule", "derived", "--exact", "--batch-size", "2",
            "--no-progress", "--out", str(out)]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    part = Partition.from_json(out)
    assert part.provenance["exact"] is True and "blocks.0.attn.q_proj.weight" in part


def test_transformers_models_are_built_with_eager_attention(tmp_path):
    """SDPA kernels have no double backward on the CPU (DESIGN.md): eager, also for configs
    whose own attn_implementation is unset; encoders become masked LMs."""
    pytest.importorskip("transformers")
    cfg = tmp_path / "bert.json"
    cfg.write_text(json.dumps({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "intermediate_size": 8,
                               "vocab_size": 20}))  # fmt: skip
    for spec in (str(cfg), "gpt2"):
        model = partition_cli.load_model(spec)
        assert model.config._attn_implementation == "eager", spec
    assert type(partition_cli.load_model(str(cfg))).__name__ == "BertForMaskedLM"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"model_type": "llama", "num_attention_heads": True},
            "must be a positive integer, got True",
        ),
        ([1, 2], "must hold a JSON object"),
        (  # was a traceback: TypeError: 'int' object is not iterable
            {"model_type": "llama", "architectures": 5},
            "architectures must be a list of class names",
        ),
    ],
)
def test_more_config_files_that_are_refused(config, message, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(config))
    code, _, err = run(["--model", str(cfg)], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_brief_joins_lines_and_cuts_long_messages():
    assert partition_cli._brief(ValueError("first\n\n  second  ")) == "first second"
    long = partition_cli._brief(ValueError("x" * 500))
    assert len(long) == 300 and long.endswith("…")
    assert partition_cli._brief(KeyError()) == "KeyError"
