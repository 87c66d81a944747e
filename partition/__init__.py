"""Parameter partitions for Adam-mini: the data model, builders, derivation and JSON.

``partition`` imports only torch, numpy and scipy; it never imports ``hessian``.
"""

from partition.blocks import RULES, TensorBlocks
from partition.core import Partition, named_shapes
from partition.coupling import BlockCoupling
from partition.derive import derive
from partition.errors import PartitionError, PartitionWarning
from partition.io import FORMAT, VERSION
from partition.rules import adam_mini, by_rows, by_tensor, elements

__all__ = [
    "FORMAT",
    "RULES",
    "VERSION",
    "BlockCoupling",
    "Partition",
    "PartitionError",
    "PartitionWarning",
    "TensorBlocks",
    "adam_mini",
    "by_rows",
    "by_tensor",
    "derive",
    "elements",
    "named_shapes",
]
