"""Memory levers for long-context training: what a decoder layer keeps from forward to backward.

Once attention is flash, three terms fill a long-context training step: the logits (the
chunked loss in ``flashlm.model.loss`` never materializes them), the layer inputs kept for
recomputation, and the activations of the one layer being recomputed, above all the MLP's
(tokens, intermediate_size) tensors. This module holds the levers for the last two:

- ``checkpoint_block``: per-layer activation checkpointing. The layer runs without a graph in
  the forward pass and is recomputed in the backward pass from its saved input. The input can
  be kept in bf16 (half the bytes of the fp32 residual stream that autocast over fp32 weights
  produces) and/or in pinned CPU memory (``ActivationOffload``: copies on a side CUDA stream,
  the next layer's input prefetched while the current one is recomputed). The recomputed MLP
  runs forward and backward chunk by chunk, so at most ``mlp_chunk_size`` tokens of MLP
  activations exist at a time, at no extra FLOPs. Its output is never needed again, only its
  gradient, so the recomputation skips the layer's last product (down_proj, ``output_linear``):
  a recomputed layer runs all its products but that one (a quarter fewer recomputed FLOPs for
  Llama's shapes), and its gradients are the plain path's bit for bit.
- ``LayerTape`` (``CheckpointOptions.keep``): outputs of chosen ops kept from the forward pass
  of a checkpointed layer, so the recomputation replays them instead of running the ops again
  (selective checkpointing). "attention": flash attention's output and lse, at long context
  the costliest op of the layer, for one (tokens, hidden) tensor in the compute dtype;
  "qkv" and "gate_up": the outputs of those projections (``tape_linear``), whose replay
  differentiates the saved product without recomputing it.
- ``block_forward``: a layer run whole (no checkpointing) with the MLP chunked over tokens:
  without a graph a plain loop; with a graph ``_ChunkedMLP``, which keeps only the MLP input
  and recomputes each chunk in the backward pass (one extra gate/up projection).

A layer here is flashlm's ``Block``, which owns its two residual halves::

    h = block.attention_residual(x, *attn_args)     # x + attn(attn_norm(x), *attn_args)
    out = block.mlp_residual(h)                     # h + mlp(mlp_norm(h))

These functions compose those two halves (the MLP half chunk by chunk where asked); the tests
hold them to the same outputs and gradients as the plain Block. ``Block.forward`` calls them,
so they always run inside the layer's ``__call__``: under FSDP2 the layer's parameters are
gathered when they run, and the recomputation in ``_CheckpointedBlock.backward`` reads the
block's parameters again after FSDP2's pre-backward hook has gathered them anew; the
gradients it returns go to the gathered parameters, which FSDP2 reduce-scatters.

Numerics: with ``save_dtype=None`` the recomputation is exact and the gradients equal the
plain path's bit for bit (without MLP chunking). A bf16 saved input changes only the
recomputation's input, by bf16 rounding, the same rounding autocast applies when it casts
the normalized input to the projections; the forward pass and the loss are unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CheckpointOptions:
    """How ``checkpoint_block`` keeps a layer's input and recomputes it.

    save_dtype: dtype the input is kept in (e.g. torch.bfloat16), None for its own dtype.
    offload: where the inputs of this forward pass go when kept in CPU memory, or None.
    mlp_chunk_size: tokens per MLP chunk in the recomputation; 0 runs the MLP whole.
    keep: the ops whose outputs the layer keeps for the recomputation (``LayerTape``): any of
        "attention", "qkv", "gate_up".
    """

    save_dtype: torch.dtype | None = None
    offload: ActivationOffload | None = None
    mlp_chunk_size: int = 0
    keep: frozenset[str] = frozenset()


class LayerTape:
    """Outputs of the kept ops (``keep``) of one checkpointed layer's forward pass, per op in
    call order, for its recomputation to replay.

    While a tape is recording (``layer_tape(tape)``), each kept op hands its results to
    ``record``; while it replays (``replay=True``), the op takes them back with ``take`` and
    attaches them to the recomputed graph without running again: flash attention through
    ``flash_attn_replay`` (other attention backends ignore the tape), a projection through
    ``tape_linear``.
    """

    def __init__(self, keep):
        self.keep = frozenset(keep)
        self._saved = {}
        self.replaying = False

    def record(self, op, *results):
        self._saved.setdefault(op, []).append(results)

    def take(self, op):
        saved = self._saved.get(op)
        if not saved:
            raise RuntimeError(f"the layer tape holds no more {op!r} results: the recomputation ran more {op} "
                               "calls than the forward pass recorded")
        return saved.pop(0)


_TAPES = threading.local()


def current_layer_tape() -> LayerTape | None:
    """The tape of the checkpointed layer running on this thread, if any."""
    return getattr(_TAPES, "tape", None)


def taped(op) -> LayerTape | None:
    """The current tape if it keeps ``op``, else None. Inside a compiled region always None:
    a block's half is compiled only where none of its ops is taped (``Block.compiled``)."""
    if torch.compiler.is_compiling():
        return None
    tape = getattr(_TAPES, "tape", None)
    return tape if tape is not None and op in tape.keep else None


@contextlib.contextmanager
def layer_tape(tape: LayerTape | None, replay: bool = False):
    """Make ``tape`` (None: no tape) current on this thread: recording, or replaying."""
    previous = current_layer_tape()
    _TAPES.tape = tape
    if tape is not None:
        tape.replaying = replay
    try:
        yield tape
    finally:
        _TAPES.tape = previous


def _linear_grads(ctx, grad):
    """The gradients of ``F.linear(x, weight)`` (x, weight saved on ``ctx``) as autograd
    computes them for the matmul (``MmBackward``: dx = dy @ W, dW = dy^T @ x), so that they
    equal the plain path's bit for bit."""
    x, weight = ctx.saved_tensors
    flat = grad.reshape(-1, grad.shape[-1])
    grad_x = flat.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
    grad_weight = flat.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
    return grad_x, grad_weight


class _ReplayedLinear(torch.autograd.Function):
    """``F.linear(x, weight)`` whose forward already ran: returns the saved product and
    differentiates it like the matmul (``_linear_grads``)."""

    @staticmethod
    def forward(ctx, x, weight, out):
        ctx.save_for_backward(x, weight)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        return *_linear_grads(ctx, grad), None


class _UnusedProductLinear(torch.autograd.Function):
    """``F.linear(x, weight)`` whose value nobody reads, only its gradient: the forward returns
    zeros of the product's shape without the matmul, the backward is the matmul's
    (``_linear_grads``)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        return _linear_grads(ctx, grad)


def tape_linear(x, weight, op):
    """``F.linear(x, weight)`` (no bias) for the projection named ``op`` ("qkv", "gate_up").

    Inside a checkpointed layer that keeps ``op``: the forward pass records the product, and
    the recomputation returns it, attached to x and weight, without the matmul. Elsewhere a
    plain ``F.linear``.
    """
    tape = taped(op)
    if tape is None:
        return F.linear(x, weight)
    if not tape.replaying:
        out = F.linear(x, weight)
        tape.record(op, out)
        return out
    (out,) = tape.take(op)
    return _ReplayedLinear.apply(*_autocast_inputs(x, weight), out)


def _autocast_inputs(x, weight):
    """The casts autocast applies to ``F.linear``'s inputs, so that a hand-made linear's graph
    is the plain path's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    return x, weight


_OUTPUT_UNUSED = threading.local()


@contextlib.contextmanager
def layer_output_unused():
    """While inside, ``output_linear`` skips its product: the recomputation of a layer's MLP
    (``_mlp_backward``) needs only the gradient of the layer's output, never its value."""
    previous = getattr(_OUTPUT_UNUSED, "on", False)
    _OUTPUT_UNUSED.on = True
    try:
        yield
    finally:
        _OUTPUT_UNUSED.on = previous


def output_linear(x, weight):
    """``F.linear(x, weight)`` (no bias) for the last product of a layer (the MLP's
    down_proj). Inside ``layer_output_unused`` it returns zeros in place of the product and
    only differentiates it, so a recomputed MLP runs two of its three matmuls (its gradients
    are the plain path's bit for bit). Inside a compiled region always the plain product."""
    if torch.compiler.is_compiling() or not getattr(_OUTPUT_UNUSED, "on", False):
        return F.linear(x, weight)
    return _UnusedProductLinear.apply(*_autocast_inputs(x, weight))


class ActivationOffload:
    """The checkpointed layer inputs of one forward pass, kept in pinned CPU memory.

    ``save`` copies a layer input to the host on ``stream`` (a side CUDA stream) as soon as
    the compute stream has produced it, so the copy overlaps the layer's forward. ``load``
    returns it to the device in the backward pass and starts copying the input of the layer
    before (the next one the backward pass needs), so that copy overlaps this layer's
    recomputation and backward. Make one per forward pass; slots are numbered in the order
    the layers ran.

    On a CPU device there is nothing to offload to: the inputs are kept as copies, which
    exercises the same bookkeeping in CPU tests.
    """

    def __init__(self, stream: torch.cuda.Stream | None = None):
        self.stream = stream
        self._host: dict[int, tuple[torch.Tensor, torch.device]] = {}
        self._fetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self._slots = 0

    @property
    def slots(self) -> int:
        """How many inputs ``save`` has taken so far (the last one is ``slots - 1``)."""
        return self._slots

    def save(self, x: torch.Tensor) -> int:
        """Start copying ``x`` to host memory; returns the slot to ``load`` it from."""
        slot = self._slots
        self._slots += 1
        if x.device.type != "cuda":
            self._host[slot] = (x.detach().clone(), x.device)
            return slot
        self.stream.wait_stream(torch.cuda.current_stream(x.device))  # x is ready
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        with torch.cuda.stream(self.stream):
            host.copy_(x.detach(), non_blocking=True)
        x.record_stream(self.stream)  # the allocator keeps x until the copy is done
        self._host[slot] = (host, x.device)
        return slot

    def prefetch(self, slot: int) -> None:
        """Start copying ``slot`` back to its device (no-op if absent or already started)."""
        if slot not in self._host or slot in self._fetched or self.stream is None:
            return
        host, device = self._host[slot]
        if device.type != "cuda":
            return
        # Ordered after the device-to-host copy, which ran on the same stream.
        with torch.cuda.stream(self.stream):
            x = host.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self._fetched[slot] = (x, ready)

    def load(self, slot: int) -> torch.Tensor:
        """The tensor saved in ``slot``, on its device; prefetches ``slot - 1``."""
        if slot not in self._host:
            raise RuntimeError("a checkpointed layer with a bf16 or offloaded input can be backpropagated once")
        host, device = self._host[slot]
        if device.type != "cuda":
            del self._host[slot]
            return host
        self.prefetch(slot)
        x, ready = self._fetched.pop(slot)
        del self._host[slot]  # the pinned block is reused once the copy has finished
        compute = torch.cuda.current_stream(device)
        compute.wait_event(ready)
        x.record_stream(compute)  # allocated on the side stream, used and freed on this one
        self.prefetch(slot - 1)
        return x


def _autocast_state(device_type):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(device_type, state):
    enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _attn_params(block):
    return list(block.attention_parameters())


def _mlp_params(block):
    return list(block.mlp_parameters())


def _grads(outputs, inputs, grad_outputs):
    """``torch.autograd.grad`` over the inputs that require grad; None for the others."""
    wanted = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True) if wanted else ())
    return [next(found) if t.requires_grad else None for t in inputs]


def _mlp_residual_no_grad(block, h, chunk_size):
    """``block.mlp_residual(h)``, ``chunk_size`` tokens at a time, without a graph."""
    flat = h.reshape(-1, h.shape[-1])
    out = flat_out = None
    for start in range(0, flat.shape[0], chunk_size):
        piece = flat[start:start + chunk_size]
        y = block.mlp_residual(piece)
        if out is None:
            # Not a view of a flat buffer: a layer that returns a view would lose FSDP2's
            # pre-backward hook to any in-place op on its output.
            out = torch.empty(*h.shape[:-1], y.shape[-1], dtype=y.dtype, device=y.device)
            flat_out = out.view(-1, y.shape[-1])
        flat_out[start:start + chunk_size] = y
    return out


def _mlp_backward(block, h, grad_out, chunk_size, params):
    """Gradients of sum(grad_out * block.mlp_residual(h)) with respect to h and ``params``,
    recomputing the MLP ``chunk_size`` tokens at a time (0: all at once).

    The residual add is part of the recomputed graph so that autograd sums h's three gradient
    contributions (residual, and the norm's two uses of h) in the order the plain layer does.
    Run under the forward pass's autocast state. Returns (grad_h shaped like h, param grads).
    """
    flat_h, flat_g = h.reshape(-1, h.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    tokens = flat_h.shape[0]
    step = chunk_size or tokens
    grad_h = torch.empty_like(flat_h)
    totals = [None] * len(params)
    for start in range(0, tokens, step):
        piece = flat_h[start:start + step].detach().requires_grad_()
        with torch.enable_grad(), layer_output_unused():  # only y's gradient is used
            y = block.mlp_residual(piece)
        grad_piece, *grads = _grads(y, [piece, *params], flat_g[start:start + step])
        grad_h[start:start + step] = grad_piece
        totals = [g if t is None else (t if g is None else t.add_(g)) for t, g in zip(totals, grads)]
    return grad_h.view_as(h), totals


class _CheckpointedBlock(torch.autograd.Function):
    """A layer whose forward keeps only its input; see ``checkpoint_block``.

    The parameters are inputs of the function, so their gradients flow through autograd as
    usual (each accumulated once per layer: DDP's hooks and ``torch.autograd.grad`` work).
    """

    @staticmethod
    def forward(ctx, x, block, attn_args, options, *params):
        ctx.block, ctx.attn_args, ctx.options = block, attn_args, options
        ctx.autocast = _autocast_state(x.device.type)
        ctx.input_dtype = x.dtype
        ctx.tape = LayerTape(options.keep) if options.keep else None
        with layer_tape(ctx.tape):
            out = block_forward(block, x, attn_args, options.mlp_chunk_size)
        ctx.kept = None
        if options.offload is not None:
            ctx.slot = options.offload.save(x.detach().to(options.save_dtype or x.dtype))
        elif options.save_dtype is not None and options.save_dtype != x.dtype:
            # A copy of our own: held on ctx so the backward pass can drop it once upcast.
            ctx.kept = x.detach().to(options.save_dtype)
        else:
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        block, options = ctx.block, ctx.options
        if options.offload is not None:
            kept = options.offload.load(ctx.slot)
        elif ctx.kept is not None:
            kept, ctx.kept = ctx.kept, None
        elif ctx.saved_tensors:
            (kept,) = ctx.saved_tensors
        else:
            raise RuntimeError("a checkpointed layer with a bf16 or offloaded input can be backpropagated once")
        x = kept.to(ctx.input_dtype).detach().requires_grad_()
        del kept  # a bf16 or offloaded copy is not needed once upcast
        attn_params, mlp_params = _attn_params(block), _mlp_params(block)
        with torch.enable_grad(), _autocast(x.device.type, ctx.autocast), layer_tape(ctx.tape, replay=True):
            h = block.attention_residual(x, *ctx.attn_args)
            grad_h, mlp_grads = _mlp_backward(block, h.detach(), grad_out, options.mlp_chunk_size, mlp_params)
        ctx.tape = None  # the replayed results now belong to the recomputed graphs
        grad_x, *attn_grads = _grads(h, [x, *attn_params], grad_h)
        return (grad_x, None, None, None, *attn_grads, *mlp_grads)


def checkpoint_block(block, x, attn_args, options: CheckpointOptions):
    """Run ``block`` on ``x`` keeping only its input for the backward pass.

    Args:
        block: a decoder layer (``Block``: ``attention_residual``, ``mlp_residual`` and their
            parameters).
        x: (batch, seqlen, hidden_size) layer input.
        attn_args: extra arguments of ``block.attention_residual`` after the input (RoPE tables,
            backend, mask); not differentiated.
        options: ``CheckpointOptions``.

    Returns:
        The layer output, shaped and typed like ``block(x, *attn_args)``.

    The backward pass recomputes the layer under the forward pass's autocast state. The
    model has no randomness (no dropout), so no RNG state is replayed.
    """
    return _CheckpointedBlock.apply(x, block, attn_args, options, *_attn_params(block), *_mlp_params(block))


class _ChunkedMLP(torch.autograd.Function):
    """``block.mlp_residual(h)`` keeping only h; the backward pass recomputes chunk by chunk."""

    @staticmethod
    def forward(ctx, h, block, chunk_size, *params):
        ctx.block, ctx.chunk_size = block, chunk_size
        ctx.autocast = _autocast_state(h.device.type)
        ctx.save_for_backward(h)
        return _mlp_residual_no_grad(block, h, chunk_size)

    @staticmethod
    def backward(ctx, grad_out):
        (h,) = ctx.saved_tensors
        with _autocast(h.device.type, ctx.autocast):
            grad_h, grads = _mlp_backward(ctx.block, h, grad_out, ctx.chunk_size, _mlp_params(ctx.block))
        return (grad_h, None, None, *grads)


def block_forward(block, x, attn_args, mlp_chunk_size):
    """``block(x, *attn_args)`` with the MLP run ``mlp_chunk_size`` tokens at a time (0: whole).

    Without a graph the chunks run in a loop; with one, ``_ChunkedMLP`` keeps only the MLP
    input and recomputes each chunk's activations in the backward pass.
    """
    h = block.attention_residual(x, *attn_args)
    tokens = h.shape[:-1].numel()
    if not mlp_chunk_size or tokens <= mlp_chunk_size:
        return block.mlp_residual(h)
    if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in _mlp_params(block))):
        return _ChunkedMLP.apply(h, block, mlp_chunk_size, *_mlp_params(block))
    return _mlp_residual_no_grad(block, h, mlp_chunk_size)
