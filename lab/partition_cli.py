"""``adam-mini-lab partition``: build, save and show parameter partitions.

Commands::

    adam-mini-lab partition --model llama2-7b --rule adam-mini --out partition.json
    adam-mini-lab partition --model my_config.json --rule rows --out rows.json
    adam-mini-lab partition --model mlp --rule derived --exact --out derived.json
    adam-mini-lab partition show partition.json

--model is a preset or a JSON config file: a transformers config (it has "model_type") or the
fields of a lab.models.TinyGPTConfig. transformers models are built on the meta device from
their config: nothing is downloaded and no memory is used. --rule derived builds a real TinyGPT
or one-hidden-layer MLP, measures the block coupling of its Hessian over one block per output
neuron (partition.by_rows), and merges strongly coupled blocks (partition.derive).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hessian
import partition
from lab.models import OneHiddenMLP, TinyGPT, TinyGPTConfig, classification_loss, lm_loss
from lab.train import check_out_file, check_seed
from partition import Partition, PartitionError

RULES = ("adam-mini", "tensor", "rows", "elements", "derived")

# name -> transformers config class and its arguments (published model shapes); with LAB_MODELS
# the one list of presets, of `partition --model` and of `memory --models` (lab.memory)
HF_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", {}),
    "gpt2-medium": ("GPT2Config", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    "gpt2-large": ("GPT2Config", {"n_embd": 1280, "n_layer": 36, "n_head": 20}),
    "gpt2-xl": ("GPT2Config", {"n_embd": 1600, "n_layer": 48, "n_head": 25}),
    "llama2-7b": (
        "LlamaConfig",
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    ),
    "llama2-13b": (
        "LlamaConfig",
        dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
             num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    ),
    "llama3-8b": (
        "LlamaConfig",
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    ),
    "mistral-7b": (
        "MistralConfig",
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    ),
    "qwen2-0.5b": (
        "Qwen2Config",
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    ),
    "qwen3-0.6b": (
        "Qwen3Config",
        dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    ),
    "bert-base": ("BertConfig", {}),
}  # fmt: skip
# name -> builder of a lab model (default sizes)
LAB_MODELS: dict[str, Callable[[], nn.Module]] = {
    "tinygpt": lambda: TinyGPT(TinyGPTConfig(), seed=0),
    "mlp": lambda: OneHiddenMLP(seed=0),
}
PRESETS = (*LAB_MODELS, *HF_PRESETS)
# the flags only --rule derived reads, with their defaults
DERIVED = {
    "method": "greedy",
    "threshold": 0.05,
    "exact": False,
    "num_samples": 8,
    "batch_size": 8,
    "seed": 0,
}
_ENCODERS = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2"}


def add_parser(subparsers: Any) -> None:
    """Register ``partition`` (and ``partition show``) on the top-level subparsers."""
    p = subparsers.add_parser(
        "partition",
        help="build a parameter partition (Adam-mini rules, simple rules, or derived) as JSON",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help=f"preset ({', '.join(PRESETS)}) or a JSON config file")
    p.add_argument("--rule", choices=RULES, default="adam-mini", help="default: adam-mini")
    p.add_argument("--out", type=Path, help="write the partition JSON here (else only print)")
    p.add_argument("--n-heads", type=int, help="override the head count of the config")
    p.add_argument("--n-kv-heads", type=int, help="override the key/value head count")
    p.add_argument("--head-dim", type=int, help="override head_dim")
    d = p.add_argument_group("--rule derived (TinyGPT / MLP only)")
    d.add_argument("--method", choices=("greedy", "spectral"), default=DERIVED["method"],
                   help=f"default {DERIVED['method']}")  # fmt: skip
    d.add_argument("--threshold", type=float, default=DERIVED["threshold"],
                   help=f"in [0, 1] (default {DERIVED['threshold']})")  # fmt: skip
    d.add_argument("--exact", action="store_true", help="dense Hessian (tiny models only)")
    d.add_argument("--num-samples", type=int, default=DERIVED["num_samples"],
                   help=f"Hutchinson rounds (default {DERIVED['num_samples']})")  # fmt: skip
    d.add_argument("--batch-size", type=int, default=DERIVED["batch_size"],
                   help=f"default {DERIVED['batch_size']}")  # fmt: skip
    d.add_argument("--seed", type=int, default=DERIVED["seed"],
                   help=f"default {DERIVED['seed']}")  # fmt: skip
    d.add_argument("--no-progress", action="store_true")
    sub = p.add_subparsers(dest="partition_command", metavar="{show}")
    show = sub.add_parser("show", help="print the summary table of a partition file")
    show.add_argument("path", type=Path, help="a partition JSON file (written by --out)")
    p.set_defaults(func=run_build)
    # what `show` refuses: any build flag given other than its default
    flags = {
        k: v for k, v in vars(p.parse_args([])).items() if k not in ("func", "partition_command")
    }
    show.set_defaults(func=run_show, build_flags=flags)


def run_show(args: argparse.Namespace) -> int:
    """``partition show FILE``: print the summary table."""
    given = [
        f"--{k.replace('_', '-')}" for k, v in args.build_flags.items() if getattr(args, k) != v
    ]
    if given:
        print(f"adam-mini-lab partition show: it takes only a FILE; drop {', '.join(given)} "
              "(they build a partition: 'partition --model M --out FILE')",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        part = Partition.from_json(args.path)
    except PartitionError as exc:
        print(f"adam-mini-lab partition show: {exc}", file=sys.stderr)
        return 1
    print(part.summary())
    return 0


def run_build(args: argparse.Namespace) -> int:
    """``partition --model M --rule R [--out FILE]``: build, print, save."""
    if args.model is None:
        print("adam-mini-lab partition: --model is required (or use 'partition show FILE')",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        if args.out is not None:  # before the build: --rule derived takes minutes
            check_out_file(args.out)
        part = build(args)
        if args.out is not None:
            part.to_json(args.out)
    except (PartitionError, ValueError, OSError) as exc:
        print(f"adam-mini-lab partition: {exc}", file=sys.stderr)
        return 1
    print(part.summary())
    if args.out is not None:
        print(f"wrote {args.out}")
    return 0


def build(args: argparse.Namespace) -> Partition:
    """The partition the arguments ask for, with the model source in its provenance."""
    heads = {
        "--n-heads": args.n_heads,
        "--n-kv-heads": args.n_kv_heads,
        "--head-dim": args.head_dim,
    }
    given = [flag for flag, value in heads.items() if value is not None]
    if given and args.rule != "adam-mini":
        raise PartitionError(
            f"{', '.join(given)} only shape --rule adam-mini (heads are not used by --rule "
            f"{args.rule}); drop them or use --rule adam-mini"
        )
    if args.rule == "derived":
        _check_derived_args(args)
    else:
        changed = [f"--{k.replace('_', '-')}" for k, v in DERIVED.items() if getattr(args, k) != v]
        if changed:
            raise PartitionError(
                f"{', '.join(changed)} only shape --rule derived (not used by --rule "
                f"{args.rule}); drop them or use --rule derived"
            )
    model = load_model(args.model, meta=True)
    if args.rule == "derived":
        if not isinstance(model, TinyGPT | OneHiddenMLP):  # checked on meta: nothing allocated
            raise PartitionError(
                "--rule derived measures the Hessian of a TinyGPT or the one-hidden-layer MLP "
                "('tinygpt', 'mlp' or a TinyGPT config file); transformers models are too large"
            )
        part = _derive(load_model(args.model, meta=False), args)
    elif args.rule == "adam-mini":
        part = partition.adam_mini(
            model, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, head_dim=args.head_dim
        )
    else:
        builders: dict[str, Callable[[nn.Module], Partition]] = {
            "tensor": partition.by_tensor,
            "rows": partition.by_rows,
            "elements": partition.elements,
        }
        part = builders[args.rule](model)
    return part.with_provenance({"model": str(args.model)})


def load_model(spec: str, meta: bool = True) -> nn.Module:
    """A preset name or a config file -> the model (transformers models on the meta device)."""
    if spec in LAB_MODELS:
        with torch.device("meta" if meta else "cpu"):
            return LAB_MODELS[spec]()
    if spec in HF_PRESETS:
        transformers = _transformers(spec)
        cls_name, kwargs = HF_PRESETS[spec]
        return _hf_model(getattr(transformers, cls_name)(**kwargs), meta)
    path = Path(spec)
    if not path.is_file():
        raise PartitionError(
            f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config file"
        )
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, too deep, too long a number
        raise PartitionError(f"config file {spec!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise PartitionError(f"config file {spec!r} must hold a JSON object")
    if "model_type" in config:
        for key in _SIZE_KEYS & set(config):  # TinyGPTConfig checks its own fields
            value = config[key]
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise PartitionError(
                    f"config file {spec!r}: {key} must be a positive integer, got {value!r}"
                )
        archs = config.get("architectures")
        if archs is not None and not (
            isinstance(archs, list) and all(isinstance(a, str) for a in archs)
        ):
            raise PartitionError(
                f"config file {spec!r}: architectures must be a list of class names such as "
                f'["LlamaForCausalLM"], got {archs!r}'
            )
        transformers = _transformers(spec)
        config = dict(config)
        model_type = config.pop("model_type")
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **config)
        except Exception as exc:  # ValueError, huggingface_hub's strict-dataclass errors, ...
            raise PartitionError(f"config file {spec!r}: {_brief(exc)}") from exc
        return _hf_model(hf_config, meta)
    known = {f.name for f in fields(TinyGPTConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise PartitionError(
            f"config file {spec!r} has no 'model_type', so it is read as a TinyGPTConfig, "
            f"which has no fields {unknown}; known fields: {sorted(known)}"
        )
    try:
        tiny = TinyGPTConfig(**config)
    except TypeError as exc:  # a field of the wrong JSON type, e.g. "init_std": "0.02"
        raise PartitionError(
            f"config file {spec!r}: TinyGPTConfig cannot take it ({_brief(exc)}); give sizes as "
            "integers, init_std as a number and tie_weights/bias as true or false"
        ) from exc
    try:
        with torch.device("meta" if meta else "cpu"):
            return TinyGPT(tiny, seed=0)
    except (TypeError, RuntimeError, OverflowError) as exc:  # sizes torch cannot hold
        raise PartitionError(
            f"config file {spec!r}: cannot build TinyGPT: {_brief(exc)}; check the config's sizes"
        ) from exc


# sizes of transformers configs, checked before transformers divides by them
_SIZE_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "num_kv_heads", "head_dim", "intermediate_size", "n_embd", "n_head",
    "n_layer", "n_positions", "max_position_embeddings",
}  # fmt: skip


def _transformers(spec: str) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise PartitionError(
            f"--model {spec!r} needs transformers: pip install 'adam-mini-lab[hf]'"
        ) from exc
    return transformers


def _hf_model(config: Any, meta: bool) -> nn.Module:
    """A transformers model from its config: the class named in ``architectures``, else a masked
    LM for encoders, a causal LM for the rest, and the bare model as a last resort."""
    import transformers

    # the setter transformers reads (and passes on to sub-configs); a plain
    # `config.attn_implementation = ...` is only stored and the model gets SDPA
    config._attn_implementation = "eager"
    classes = [
        getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)
    ]
    if config.model_type in _ENCODERS:
        classes.append(transformers.AutoModelForMaskedLM)
    classes += [transformers.AutoModelForCausalLM, transformers.AutoModel]
    last: Exception | None = None
    with torch.device("meta" if meta else "cpu"):
        for cls in classes:
            try:
                return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
            except Exception as exc:  # a class that does not fit this config: try the next
                last = exc
    raise PartitionError(
        f"cannot build a transformers model for model_type {config.model_type!r}: "
        f"{_brief(last)}; check the config's sizes (e.g. heads must divide the hidden size)"
    )


def _brief(exc: BaseException | None, limit: int = 300) -> str:
    """The exception's message on one line (its lines joined), cut at ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_derived_args(args: argparse.Namespace) -> None:
    """Refuse bad --rule derived settings before the (minutes-long) Hessian measurement."""
    if not 0.0 <= args.threshold <= 1.0:
        raise PartitionError(f"--threshold must be in [0, 1], got {args.threshold}")
    if not args.exact and args.num_samples < 2:
        raise PartitionError(
            f"--num-samples must be >= 2 (the estimate's standard errors), got {args.num_samples}"
        )
    if args.batch_size < 1:
        raise PartitionError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_seed(args.seed)


def _derive(model: nn.Module, args: argparse.Namespace) -> Partition:
    """Measure the block coupling of ``by_rows(model)`` and derive a partition from it."""
    if isinstance(model, TinyGPT):
        from lab.data import Corpus

        gen = torch.Generator().manual_seed(args.seed)
        x, y = Corpus.stdlib().batch("train", args.batch_size, model.config.context, gen)
        vocab = model.config.vocab_size
        data = (x % vocab, y % vocab)  # bytes folded into a smaller vocabulary
        loss = lm_loss
    else:  # OneHiddenMLP (build checked the type)
        from lab.data import gaussian_classification

        d, c = model.fc1.in_features, model.fc2.out_features
        X, y = gaussian_classification(max(args.batch_size, 4 * c), d, c, seed=args.seed)
        data = (X.double(), y)  # the float32 draw, in float64 for the Hessian
        loss = classification_loss
    n = sum(p.numel() for p in model.parameters())
    if args.exact and n > hessian.coupling.EXACT_MAX:
        raise PartitionError(
            f"--exact builds the dense Hessian, refused above {hessian.coupling.EXACT_MAX:,} "
            f"parameters, and this model has {n:,}: drop --exact and give --num-samples N (the "
            "matrix-free estimate)"
        )
    model = model.double()
    H = hessian.HessianOperator(model, loss, data)
    coupling = hessian.block_coupling(
        H, partition.by_rows(model), num_samples=args.num_samples, seed=args.seed,
        exact=args.exact, progress=not args.no_progress,
    )  # fmt: skip
    return partition.derive(coupling, threshold=args.threshold, method=args.method)
