"""Tensor-parallel helpers for the layers (see lingjax/sharding.py for the mesh and the specs).

The layers are written once. Under `jax.shard_map` over the mesh axis `TP` they see their local
shards (local heads, local experts, local MLP width) and derive local sizes from the shapes; these
helpers give them the device's index on the axis and the one all-reduce that ends each block.
Outside any shard_map (tp = 1, the default) they are no-ops, so that path has no collectives and is
numerically unchanged.
"""
import jax

TP = "tp"


def tp_size() -> int:
    """Devices on the tensor-parallel axis (1 outside shard_map)."""
    try:
        return jax.lax.axis_size(TP)
    except NameError:           # no shard_map over TP is being traced
        return 1


def tp_index():
    """This device's index on the tensor-parallel axis (a traced int32 under shard_map, else 0)."""
    return jax.lax.axis_index(TP) if tp_size() > 1 else 0


def tp_psum(x):
    """Sum the per-device partial results of a row-parallel projection (identity when tp = 1)."""
    return jax.lax.psum(x, TP) if tp_size() > 1 else x
