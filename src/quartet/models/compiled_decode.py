"""The compiled decode step (`rollout.compile`): a lean decode step over a static KV cache, through torch.compile.

An eager decode step at the sizes RL starts with is dozens of small operators, each paying Python
and dispatch overhead, and projections whose matrix products run well under the CPU's peak at a
few dozen rows. The compiled step removes both:
- inductor fuses the step's elementwise work (norms, activation, residual adds, the cache write,
  the key mask) into a few C++ loops, with no Python between them;
- on CPU in float32, each projection runs on its weight prepacked for oneDNN's blocked layout
  (about 1.2-1.4x the plain matrix product at 32 rows). The packed copies are made again
  before every rollout (a read of the weights, like one decode step's), so a step never reads
  weights an update has changed since.

The step is `models/lean.py`'s decode step (the same operations in the model's order) over a
static cache: attention reads the whole buffer, the positions not yet written masked, and the new
token's key and value beside it; the step returns them and one write after it stores them at the
slot (a write inside the graph would copy the whole buffer per layer). Shapes are fixed per (rows, cache
capacity): the sampler rounds capacities up to `CAPACITY_UNIT`, and adopts its preallocated cache
into buffers kept here per shape, so one compilation (and on CUDA, where the step is compiled in
"reduce-overhead" mode, one graph capture) serves every step and rollout of that shape.

Numerics: the packed products and the fused kernels round differently from the eager step in the
last bits, so sampled tokens match the eager sampler's except where a draw falls within that
distance of a boundary. The sampled tokens' log-probs stay within float32 rounding of the
trainer's forward, as the eager step's do (a cached step never rounds as a full forward does): on
the anchor shape, at most 1.9e-6 from it (eager: 9.5e-7), so they serve as old log-probs unless
`rollout.logprobs_from_generation` is off. A model the lean passes do not know, or a compilation
that fails, decodes eagerly after one note.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from quartet.models.lean import lean_decode_step, lean_unsupported, projection_weight

CAPACITY_UNIT = 64  # cache capacities are rounded up to a multiple of this: one compilation per multiple


def compiled_capacity(positions: int) -> int:
    """The static cache capacity that holds `positions`: the next multiple of `CAPACITY_UNIT`."""
    return -(-positions // CAPACITY_UNIT) * CAPACITY_UNIT


@torch.library.custom_op("quartet::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [rows, in] @ weight.T + bias with a weight prepacked by `torch.ops.mkldnn._reorder_linear_weight`.

    A custom op, so that inductor calls oneDNN's kernel as it is (its own lowering of this op wants
    weights frozen into the graph as constants, which an RL run's weights are not)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def can_pack(model: torch.nn.Module) -> bool:
    """Prepacked projections apply: float32 weights on CPU, oneDNN built in, no autocast to lower precision."""
    weight = next(model.parameters())
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu"))


class PackedProjections:
    """The plain projections' weights prepacked for oneDNN; `repack` packs them again from the current weights."""

    def __init__(self, rows_hint: int):
        self.rows_hint = rows_hint
        self.entries: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # each weight and [its packed copy]

    def linear(self, module: torch.nn.Module) -> Callable:
        """What `lean_decode_step(linear=...)` takes: the packed product for a plain projection, else its default."""
        found = projection_weight(module)
        if found is None:
            return module
        weight, bias = found
        cell = [self._pack(weight)]  # replaced by `repack`; the compiled step reads it at each call
        self.entries.append((weight, cell))
        out_features, in_features = weight.shape

        def run(x: torch.Tensor) -> torch.Tensor:
            return packed_linear(x.reshape(-1, in_features), cell[0], bias, out_features).view(*x.shape[:-1],
                                                                                                out_features)

        return run

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), self.rows_hint)

    def repack(self) -> None:
        """Pack every weight again. Done before each rollout: an update may have changed any of them, and
        fused optimizers (AdamW's `fused=True`) write parameters without moving their version counters."""
        for weight, cell in self.entries:
            cell[0] = self._pack(weight)


class _PendingLayer:
    """A cache layer for the lean step that leaves the cache as it is: attention reads the cached positions
    and the new token's key and value beside them (`_split_attention`), which the step returns.

    Writing the new position inside the compiled graph would make inductor copy the whole buffer
    (a mutated graph input), a pass over the cache per layer and step; one write after the step,
    outside the graph, touches the new position only."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[tuple, tuple]:
        self.new = (key, value)
        return (self.keys, key), (self.values, value)


def _split_attention(attn: torch.nn.Module, query: torch.Tensor, key: tuple[torch.Tensor, torch.Tensor],
                     value: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """One query token's attention [rows, 1, heads, head_dim] over the cache (`key[0]`, `value[0]`: [rows,
    kv_heads, capacity, head_dim], `mask` [rows, 1, 1, capacity] True where a key counts) and the new
    token's own key and value (`key[1]`, `value[1]`: [rows, kv_heads, 1, head_dim]); grouped-query heads
    share their key/value head."""
    cached_keys, new_key = key
    cached_values, new_value = value
    rows, heads, _, head_dim = query.shape
    kv_heads = cached_keys.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, head_dim)  # [rows, kv_heads, group, head_dim]
    scores = torch.cat([torch.matmul(grouped, cached_keys.transpose(-1, -2)).masked_fill(~mask, float("-inf")),
                        (grouped * new_key).sum(-1, keepdim=True)], dim=-1) * attn.scaling
    weights = scores.float().softmax(-1).to(query.dtype)
    out = torch.matmul(weights[..., :-1], cached_values) + weights[..., -1:] * new_value
    return out.reshape(rows, 1, heads, head_dim)


def _static_step(lean_step: Callable, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                 key_mask: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits [rows, vocab] after `tokens` [rows, 1] at `positions`, and the new keys and values
    [layers, rows, kv_heads, 1, head_dim] to write at cache `slot` ([1]); `keys`, `values` [layers, rows,
    kv_heads, capacity, head_dim] hold the positions before the slot, `key_mask` [rows, capacity] is
    False on padding."""
    cached = torch.arange(keys.shape[3], device=key_mask.device) < slot
    mask = (key_mask & cached)[:, None, None, :]
    layers = [_PendingLayer(k, v) for k, v in zip(keys.unbind(0), values.unbind(0))]
    logits = lean_step(tokens, positions, layers, mask)
    return (logits, torch.stack([layer.new[0] for layer in layers]), torch.stack([layer.new[1] for layer in layers]))


class CompiledDecoder:
    """Compiled decode steps of one causal LM, per (rows, cache capacity), and the static cache buffers they use.

    `note(text)` receives the one-line messages: a compilation and its time, a fallback and why.
    """

    def __init__(self, model: torch.nn.Module, note: Callable[[str], None] = print):
        self.model, self.note = model, note
        self.unsupported = lean_unsupported(model)
        self.failed = ""  # why compilation failed: every later step decodes eagerly
        self.packed: PackedProjections | None = None
        self._compiled: Callable | None = None
        self._shapes_compiled: set[tuple] = set()
        self.buffers: dict[tuple, tuple] = {}  # per shape: keys, values and their per-layer views
        if self.unsupported:
            note(f"rollout.compile: decoding eagerly, the compiled step does not apply: {self.unsupported}")

    @property
    def usable(self) -> bool:
        return not (self.unsupported or self.failed)

    def _build(self, rows: int) -> None:
        model = self.model
        self.packed = PackedProjections(rows) if can_pack(model) else None
        lean_step = lean_decode_step(model, linear=self.packed.linear if self.packed else None,
                                     attention=_split_attention)
        if lean_step is None:  # e.g. the model was put in train mode
            self.unsupported = "the lean decode step does not apply (is the model in eval mode?)"
            return
        device = next(model.parameters()).device
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        step = torch.compile(_static_step, dynamic=False, fullgraph=True, mode=mode)
        self._compiled = lambda *args: step(lean_step, *args)

    def adopt(self, layers: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the sampler's preallocated cache layers into this decoder's buffers for their shape (kept
        across rollouts: fixed addresses), and point the layers at views of them; the keys and values
        [layers, rows, kv_heads, capacity, head_dim]."""
        first = layers[0]._key_buffer
        shape_key = (len(layers), *first.shape, first.dtype, first.device)
        if shape_key not in self.buffers:
            keys = first.new_zeros(len(layers), *first.shape)
            values = first.new_zeros(len(layers), *layers[0]._value_buffer.shape)
            if first.device.type == "cuda":
                for buffer in (keys, values):
                    torch._dynamo.mark_static_address(buffer)
            self.buffers[shape_key] = (keys, values, list(keys.unbind(0)), list(values.unbind(0)))
        keys, values, key_views, value_views = self.buffers[shape_key]
        for layer, k, v in zip(layers, key_views, value_views):
            if layer._key_buffer is not k:
                k[:, :, : layer.length] = layer._key_buffer[:, :, : layer.length]
                v[:, :, : layer.length] = layer._value_buffer[:, :, : layer.length]
                layer.adopt(k, v)
        return keys, values

    def prepare(self, rows: int) -> bool:
        """Before a rollout of `rows` rows: build on first use, else repack the weights; False where decoding
        is eager."""
        if not self.usable:
            return False
        if self._compiled is None:
            self._build(rows)  # packs the weights
            if not self.usable:
                self.note(f"rollout.compile: decoding eagerly: {self.unsupported}")
                return False
        elif self.packed is not None:
            self.packed.repack()
        return True

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int, key_mask: torch.Tensor,
             layers: list) -> torch.Tensor | None:
        """Logits [rows, vocab] after `tokens` [rows, 1], written at `slot` of the adopted `layers` (which
        advance by one), or None where this decoder cannot (the caller then runs the eager step)."""
        keys, values = self.adopt(layers)
        slot_tensor = torch.full((1,), slot, dtype=torch.long, device=tokens.device)
        args = (tokens, positions, slot_tensor, key_mask, keys, values)
        shape = (*keys.shape, keys.dtype, keys.device.type)
        if shape not in self._shapes_compiled:
            self.note(f"rollout.compile: compiling the decode step for {keys.shape[1]} rows x {keys.shape[3]} cache "
                      "positions (once per shape)")
            start = time.perf_counter()
            try:  # each shape and model is one more entry in the step's cache: allow many per process
                with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
                    logits, new_keys, new_values = self._run(*args)
            except Exception as err:  # a platform or model inductor cannot compile: eager, never a failed run
                lines = str(err).strip().splitlines()
                self.failed = f"{type(err).__name__}: {lines[0] if lines else ''}"
                self.note(f"rollout.compile: compilation failed, decoding eagerly from here on ({self.failed})")
                return None
            seconds = time.perf_counter() - start
            self._shapes_compiled.add(shape)
            self.note(f"rollout.compile: compiled in {seconds:.1f}s")
        else:
            logits, new_keys, new_values = self._run(*args)
        keys.select(3, slot).copy_(new_keys.squeeze(3))  # a strided copy: index_copy_ walks the whole buffer
        values.select(3, slot).copy_(new_values.squeeze(3))
        for layer in layers:
            layer.advance(1)
        return logits

    def _run(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if args[0].device.type == "cuda":  # a captured graph's outputs are overwritten by its next replay
            torch.compiler.cudagraph_mark_step_begin()
            return tuple(out.clone() for out in self._compiled(*args))
        return self._compiled(*args)
