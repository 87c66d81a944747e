"""Adam-mini: Adam with one second-moment entry per block of a partition.

Public API: :class:`AdamMini` (a ``torch.optim.Optimizer``), :func:`load_checkpoint`
(resume from a ``torch.distributed.checkpoint`` with the partition checked) and
:func:`state_bytes` (optimizer-state memory accounting, meta device OK).
"""

from optimizer.adam_mini import AdamMini
from optimizer.checkpoint import load_checkpoint
from optimizer.memory import StateBytes, state_bytes

__all__ = ["AdamMini", "StateBytes", "load_checkpoint", "state_bytes"]
