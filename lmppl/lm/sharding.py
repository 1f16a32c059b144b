"""Tensor-parallel placement of a language model over one axis of a device mesh.

``lmppl.lm.shard(lm, mesh, model_axis="model")`` returns a copy of ``lm`` whose parameters
are split over the ``n`` devices of the mesh axis ``model_axis`` in the Megatron layout, and
whose KV cache is split over its key/value heads, so a model larger than one device runs
on several. Beside it, the mesh's first axis can shard the particle axis as before
(``SMC(..., mesh=mesh)``): on a ``(2, 4)`` mesh ``("particles", "model")`` each group of
4 devices holds one copy of the model and half of the particles.

Layout (``H`` hidden size, ``I`` MLP width, ``heads · D`` the attention width; a scanned
stack's leading layer axis, :func:`lmppl.lm.scanned`, is never split):

* column-split (each device holds ``1/n`` of the output features, i.e. ``heads/n`` whole
  heads, or ``I/n`` MLP features; no communication): the query, key and value projections
  ``q_proj``, ``k_proj``, ``v_proj`` (Llama, Gemma, GPT-Neo) ``[H, heads·D]`` and their
  biases, and the MLP's ``gate_proj`` / ``up_proj`` (Llama, Gemma) or ``c_fc`` (GPT-2,
  GPT-Neo) ``[H, I]`` and biases;
* row-split (each device holds ``1/n`` of the input features, multiplies its slice of the
  heads / MLP features, and the partial products are all-reduced; the bias, replicated, is
  added once after the sum): the attention output ``o_proj`` / ``out_proj`` / GPT-2's
  ``attn.c_proj`` ``[heads·D, H]`` and the MLP output ``down_proj`` / ``c_proj`` ``[I, H]``;
* GPT-2's fused ``c_attn`` ``[H, 3H]`` holds q, k and v side by side, so a contiguous
  column split would not fall on head boundaries: it is row-split (one more all-reduce per
  layer), and each device then keeps its own heads of q, k and v;
* replicated: token and position embeddings, the output head, and every norm (the logits
  are computed whole on each device, so sampling sees exactly the unsharded logits);
* the KV cache: keys and values ``[B, L, H_kv, D]`` (``[B, layers, L, H_kv, D]`` scanned)
  are split over ``H_kv``, the other axes left to the particle sharding and to XLA.

So ``num_heads``, ``num_kv_heads`` and the MLP width (and GPT-2's hidden size) must be
divisible by ``n``; :func:`shard` says which is not in one line. GSPMD (``jax.jit`` on the
placed parameters plus sharding constraints on the parameters and the cache in
:meth:`~lmppl.lm.base.LanguageModel.apply`) inserts the communication: two all-reduces of
``[B, S, H]`` per layer (three for GPT-2). Row-split products add their partial sums in
another order than one device may, so results agree with the unsharded model to float
rounding, not necessarily bit for bit.

The parameters are placed with :func:`jax.make_array_from_callback`, each device receiving
only its slices, so a model loaded into host memory (e.g. under
``jax.default_device(jax.devices("cpu")[0])``) never needs one accelerator to hold it
whole; in a multi-process run every process places its own devices' slices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lmppl.lm.base import KVCache, LanguageModel
from lmppl.lm.config import ModelConfig

__all__ = ["SHARDABLE_ARCHITECTURES", "ModelSharding", "auto_mesh", "shard"]

SHARDABLE_ARCHITECTURES: tuple[str, ...] = ("llama", "gemma", "gpt2", "gpt_neo")

# Modules whose output features are split (column-parallel) and those whose input features
# are (row-parallel); named as in lmppl's networks (see the module docstring).
_COLUMN = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_fc"})
_ROW = frozenset({"o_proj", "out_proj", "down_proj", "c_proj", "c_attn"})
_UNCONSTRAINED = PartitionSpec.UNCONSTRAINED


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in ``AxisType.Auto`` (``jax.make_mesh`` makes Explicit ones):
    lmppl places arrays with sharding constraints and lets XLA propagate them."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _names(path: tuple) -> list[str]:
    """The module and attribute names of a parameter's pytree path (``nnx.State``)."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            names.append(key.name)
    return names


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSharding:
    """Where a sharded model's parameters and cache live (see the module docstring).

    Attributes:
      mesh: the device mesh (axes in ``AxisType.Auto``).
      axis: the name of the mesh axis the model is split over.
    """

    mesh: Mesh
    axis: str

    @property
    def size(self) -> int:
        """``n``, the number of devices the model is split over."""
        return self.mesh.shape[self.axis]

    def check(self, config: ModelConfig) -> None:
        """One-line ``ValueError`` when a split dimension is not divisible by ``n``."""
        widths = [
            ("num_heads", config.num_heads),
            ("num_kv_heads", config.num_kv_heads),
            ("intermediate_size", config.intermediate_size),
        ]
        if config.architecture == "gpt2":  # c_attn is row-split over the hidden size
            widths.append(("hidden_size", config.hidden_size))
        for name, width in widths:
            if width % self.size:
                raise ValueError(
                    f"{name}={width} is not divisible by mesh axis '{self.axis}' of size "
                    f"{self.size}"
                )

    def parameter_spec(self, path: tuple, ndim: int) -> PartitionSpec:
        """The ``PartitionSpec`` of the parameter at ``path`` (a pytree path) of rank ``ndim``."""
        names = _names(path)
        leaf, module = names[-1], names[-2] if len(names) > 1 else ""
        if module in _COLUMN:
            trailing = (None, self.axis) if leaf == "kernel" else (self.axis,)
        elif module in _ROW and leaf == "kernel":
            trailing = (self.axis, None)
        else:
            return PartitionSpec()
        return PartitionSpec(*(None,) * (ndim - len(trailing)), *trailing)

    def parameter_shardings(self, params: Any) -> Any:
        """A pytree like ``params`` of each parameter's ``NamedSharding``."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(self.mesh, self.parameter_spec(path, x.ndim)), params
        )

    def constrain_params(self, params: Any) -> Any:
        """``params`` constrained to their layout (inside ``jit``; a no-op on placed ones)."""
        return jax.tree.map(
            jax.lax.with_sharding_constraint, params, self.parameter_shardings(params)
        )

    def constrain_cache(self, cache: Any) -> Any:
        """A :class:`KVCache`'s keys and values constrained to be split over their heads
        axis (the second last); every other axis is left unconstrained."""
        if not isinstance(cache, KVCache):
            return cache

        def heads(x: jax.Array) -> jax.Array:
            spec = PartitionSpec(*(_UNCONSTRAINED,) * (x.ndim - 2), self.axis, _UNCONSTRAINED)
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        return cache._replace(
            keys=jax.tree.map(heads, cache.keys), values=jax.tree.map(heads, cache.values)
        )


def _place(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``x`` as a global array with ``sharding``: each addressable device gets its slice."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard(lm: LanguageModel, mesh: Mesh, model_axis: str = "model") -> LanguageModel:
    """A copy of ``lm`` split tensor-parallel over the mesh axis ``model_axis``.

    The parameters are placed on the mesh (column- or row-split by role, the rest
    replicated; see :mod:`lmppl.lm.sharding`) and the model's KV caches are kept split over
    their key/value heads. Use the result like ``lm`` (``lmppl.LM(sharded, ...)``,
    ``lmppl.generate``, ``SMC(..., mesh=mesh)``: the mesh's first axis, if other than
    ``model_axis``, then shards the particles). Shard last: :func:`lmppl.lm.scanned` and
    :func:`lmppl.lm.truncated` build unsharded models.

    Raises ``ValueError`` (one line) when the architecture is not a decoder of
    :data:`SHARDABLE_ARCHITECTURES`, the mesh has no axis ``model_axis``, or a head count or
    width is not divisible by its size (e.g. ``num_kv_heads=2 is not divisible by mesh axis
    'model' of size 4``).
    """
    architecture = getattr(getattr(lm, "config", None), "architecture", None)
    if type(lm) is not LanguageModel or architecture not in SHARDABLE_ARCHITECTURES:
        raise ValueError(
            f"model sharding supports the {', '.join(SHARDABLE_ARCHITECTURES)} decoders, not "
            f"{getattr(lm, 'name', type(lm).__name__)} ({architecture or type(lm).__name__})"
        )
    if model_axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {model_axis!r} (its axes: {mesh.axis_names})")
    layout = ModelSharding(auto_mesh(mesh), model_axis)
    layout.check(lm.config)
    params = jax.tree.map(_place, lm.params, layout.parameter_shardings(lm.params))
    sharded = lm.with_params(params)
    sharded.model_sharding = layout
    return sharded
