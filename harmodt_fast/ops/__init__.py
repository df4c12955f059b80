"""The fast ops, each with backends "triton" | "cpp" | "torch" behind one function (see _dispatch.py)."""
from harmodt_fast.ops._dispatch import (
    available_backends,
    call_counts,
    check_backend,
    implemented_backends,
    last_backend,
    runs_fused,
)
from harmodt_fast.ops.dropout import dropout
from harmodt_fast.ops.harmony import harmony_update, task_agreement
from harmodt_fast.ops.masked_attention import masked_attention
from harmodt_fast.ops.masked_linear import masked_linear
from harmodt_fast.ops.masked_mlp import masked_mlp
from harmodt_fast.ops.packing import pack_masks, unpack_masks

__all__ = [
    "available_backends",
    "call_counts",
    "check_backend",
    "runs_fused",
    "dropout",
    "implemented_backends",
    "last_backend",
    "harmony_update",
    "masked_attention",
    "task_agreement",
    "masked_linear",
    "masked_mlp",
    "pack_masks",
    "unpack_masks",
]
