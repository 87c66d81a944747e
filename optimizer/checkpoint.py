"""Resume an :class:`AdamMini` from a ``torch.distributed.checkpoint`` (DCP) directory.

DCP fills the tensors of a live ``state_dict`` in place and checks sizes itself, so a
checkpoint saved under another partition fails inside DCP's planner with
``Size mismatch ... for optim.state.3.exp_avg_sq``, which names neither the tensor nor
the fix. :func:`load_checkpoint` first reads the checkpoint's metadata (sizes only, no
tensor data) and compares every saved ``exp_avg``/``exp_avg_sq`` with what this
optimizer's partition gives, then loads.
"""

from __future__ import annotations

import os
import re

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from optimizer.adam_mini import AdamMini

_STATE_KEY = re.compile(r"state\.(\d+)\.(exp_avg|exp_avg_sq)$")
_GROUP_KEY = re.compile(r"param_groups\.(\d+)\.")


def load_checkpoint(opt: AdamMini, checkpoint_id: str | os.PathLike, *, key: str = "optim") -> None:
    """Load ``opt``'s state from the DCP checkpoint saved as ``{key: opt.state_dict(), ...}``.

    The same as ``opt.init_state(); sd = opt.state_dict(); dcp.load({key: sd}, checkpoint_id);
    opt.load_state_dict(sd)``, with the partition checked first: a state saved under another
    partition is a :class:`partition.PartitionError` naming the tensor. Tensors are matched by
    the saved ``param_names``, as :meth:`AdamMini.load_state_dict` matches them, where that
    recipe needs the saved order (DCP fills ``state.i`` with the saved ``i``-th tensor's state,
    in a buffer shaped and typed for this optimizer's ``i``-th tensor). Parameters that had no
    state when saved (never stepped) have none after loading. A missing, corrupt or
    mismatched checkpoint raises before ``opt`` changes. Under a process group (FSDP2, DDP)
    every rank calls it, as with ``dcp.load``.
    """
    if not isinstance(opt, AdamMini):
        raise TypeError(f"load_checkpoint takes an AdamMini, got {type(opt).__name__}")
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint_id must be the directory given to dcp.save (a str or os.PathLike), got "
            f"{type(checkpoint_id).__name__}"
        )
    path = os.fspath(checkpoint_id)
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no torch.distributed.checkpoint at {path!r} (its '.metadata' file is missing); "
            "pass the directory given to dcp.save(..., checkpoint_id=...)"
        ) from None
    except Exception as err:
        raise ValueError(
            f"checkpoint {path!r}: its '.metadata' file cannot be read ({type(err).__name__}: "
            f"{err}); it is corrupt or was cut short: save it again or resume from an earlier one"
        ) from err
    saved = _saved_shapes(metadata.state_dict_metadata, key, path)
    params = [p for group in opt.param_groups for p in group["params"]]
    groups = {
        int(m.group(1))
        for k in metadata.state_dict_metadata
        if k.startswith(f"{key}.") and (m := _GROUP_KEY.match(k.removeprefix(f"{key}.")))
    }
    by_index: dict[int, torch.Tensor] = {}
    if len(groups) == len(opt.param_groups):
        # the saved state's ids are the saved positions: match them to our tensors by the saved
        # param_names as load_state_dict does (by position, a tensor of the same shape at the
        # same index would be given another's state, read through its buffer's dtype)
        saved_groups = opt._in_our_order({"param_groups": _saved_groups(opt, metadata, key, path)})
        ordered = saved_groups["param_groups"]
        if [len(g["params"]) for g in ordered] == [len(g["params"]) for g in opt.param_groups]:
            by_index = dict(zip((i for g in ordered for i in g["params"]), params, strict=True))
    if not by_index or any(i not in by_index for i in saved):
        raise ValueError(
            f"checkpoint {path!r} holds an optimizer of {len(groups)} param group(s) with state "
            f"up to tensor index {max(saved, default=-1)}, but this optimizer has "
            f"{len(opt.param_groups)} group(s) and {len(params)} tensors; build it with the same "
            "parameters and param groups as the saved one"
        )
    for index, shapes in saved.items():
        opt.check_saved_shapes(by_index[index], shapes)
    # DCP fills fresh tensors, never opt's own: a failed read leaves opt unchanged
    state_dict = opt.state_dict()
    state_dict["state"] = {i: opt.new_state(by_index[i]) for i in saved}
    # the records the checkpoint holds: none in torch.optim's format, and under other names when
    # saved through a wrapper (DDP's "module.", torch.compile's "_orig_mod."), as load_state_dict
    prefix = f"{key}.blocks."
    recorded = {k[len(prefix) :] for k in metadata.state_dict_metadata if k.startswith(prefix)}
    state_dict["blocks"] = {n: b for n, b in state_dict["blocks"].items() if n in recorded}
    for i, group in enumerate(state_dict["param_groups"]):  # nor the names, where not saved
        if f"{key}.param_groups.{i}.param_names" not in metadata.state_dict_metadata:
            group.pop("param_names", None)
    _load({key: state_dict}, path)
    opt.load_state_dict(state_dict)


def _saved_shapes(entries: dict, key: str, path: str) -> dict[int, dict[str, tuple[int, ...]]]:
    """``{tensor index: {"exp_avg": shape, "exp_avg_sq": shape}}`` from DCP metadata."""
    prefix = f"{key}."
    if not any(k.startswith(prefix) for k in entries):
        tops = sorted({k.split(".", 1)[0] for k in entries})
        raise ValueError(
            f"checkpoint {path!r} has nothing saved under {key!r} (its top-level keys: {tops}); "
            "pass key= the name the optimizer's state_dict was saved under"
        )
    shapes: dict[int, dict[str, tuple[int, ...]]] = {}
    for k, meta in entries.items():
        m = _STATE_KEY.match(k.removeprefix(prefix)) if k.startswith(prefix) else None
        if m:
            shapes.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(meta.size)
    return shapes


def _saved_groups(opt: AdamMini, metadata, key: str, path: str) -> list[dict]:
    """The saved param groups' ``params`` (state ids) and ``param_names`` (where saved)."""
    groups = []
    for i, g in enumerate(opt.param_groups):  # placeholders of the right types, for DCP to fill
        group = {"params": list(range(len(g["params"])))}
        if f"{key}.param_groups.{i}.param_names" in metadata.state_dict_metadata:
            group["param_names"] = list(g["param_names"])
        groups.append(group)
    _load({key: {"param_groups": groups}}, path)
    return groups


def _load(state_dict: dict, path: str) -> None:
    """``dcp.load``, a failed read as a ``RuntimeError`` that says the optimizer is unchanged."""
    try:
        dcp.load(state_dict, checkpoint_id=path)
    except CheckpointException as err:  # a BaseException, with every rank's traceback
        causes = "; ".join(f"rank {r}: {e!r}" for r, (e, _) in err.failures.items())
        raise RuntimeError(
            f"checkpoint {path!r} could not be read ({causes}); it is corrupt or incomplete: "
            "save it again or resume from an earlier one. The optimizer is unchanged"
        ) from err
