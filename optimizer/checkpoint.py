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

from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from optimizer.adam_mini import AdamMini

_STATE_KEY = re.compile(r"state\.(\d+)\.(exp_avg|exp_avg_sq)$")
_GROUP_KEY = re.compile(r"param_groups\.(\d+)\.")


def load_checkpoint(opt: AdamMini, checkpoint_id: str | os.PathLike, *, key: str = "optim") -> None:
    """Load ``opt``'s state from the DCP checkpoint saved as ``{key: opt.state_dict(), ...}``.

    The same as ``opt.init_state(); sd = opt.state_dict(); dcp.load({key: sd}, checkpoint_id);
    opt.load_state_dict(sd)``, with the partition checked first: a state saved under another
    partition is a :class:`partition.PartitionError` naming the tensor. Parameters that had no
    state when saved (never stepped) have none after loading. A missing, corrupt or
    mismatched checkpoint raises before ``opt`` changes. Under a process group (FSDP2, DDP)
    every rank calls it, as with ``dcp.load``.
    """
    if not isinstance(opt, AdamMini):
        raise TypeError(f"load_checkpoint takes an AdamMini, got {type(opt).__name__}")
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
    if len(groups) != len(opt.param_groups) or max(saved, default=-1) >= len(params):
        raise ValueError(
            f"checkpoint {path!r} holds an optimizer of {len(groups)} param group(s) with state "
            f"up to tensor index {max(saved, default=-1)}, but this optimizer has "
            f"{len(opt.param_groups)} group(s) and {len(params)} tensors; build it with the same "
            "parameters and param groups, in the same order, as the saved one"
        )
    for index, shapes in saved.items():
        opt.check_saved_shapes(params[index], shapes)
    # DCP fills fresh tensors, never opt's own: a failed read leaves opt unchanged
    state_dict = opt.state_dict()
    state_dict["state"] = {i: opt.new_state(params[i]) for i in saved}
    # the records the checkpoint holds: none in torch.optim's format, and under other names when
    # saved through a wrapper (DDP's "module.", torch.compile's "_orig_mod."), as load_state_dict
    prefix = f"{key}.blocks."
    recorded = {k[len(prefix) :] for k in metadata.state_dict_metadata if k.startswith(prefix)}
    state_dict["blocks"] = {n: b for n, b in state_dict["blocks"].items() if n in recorded}
    try:
        dcp.load({key: state_dict}, checkpoint_id=path)
    except CheckpointException as err:  # a BaseException, with every rank's traceback
        causes = "; ".join(f"rank {r}: {e!r}" for r, (e, _) in err.failures.items())
        raise RuntimeError(
            f"checkpoint {path!r} could not be read ({causes}); it is corrupt or incomplete: "
            "save it again or resume from an earlier one. The optimizer is unchanged"
        ) from err
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
