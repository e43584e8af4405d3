"""Gradient checkpointing that bounds memory: the backward pass one block at a time.

mlx-lm's `grad_checkpoint` wraps each block in `mx.checkpoint`, but the whole step is still one
graph evaluated at once, and MLX runs ahead of its evaluation: it recomputes many blocks'
activations before the backward consumes them, so ~80% of the trainable blocks' activations are
alive at the peak anyway (fitted in plan.py; ~10% saved on SmolLM2). Here the step is driven
block by block, with an evaluation at every block boundary:

1. forward: the frozen blocks, then each trainable block, keeping only its input (B x L x D) and
   evaluating its output before the next block runs;
2. the final norm, head and loss (chunked: loss.py) with the gradient at the last hidden state;
3. backward, last block first: the block's forward recomputed from its saved input and its
   vector-Jacobian product taken (input and parameter gradients), evaluated before the next.

So one block's activations are alive at a time, plus every trainable block's input. The ops are
the plain forward's, in the same order, so the loss is the plain path's and the gradients equal
it to fp32 rounding (tests/training/fast/test_blockwise.py). Dropout draws the same masks in the
recomputation as in the forward (the random key is put back to each block's own before it).

Only for families whose model is embed -> blocks -> norm with the head after it (the shared
prefix's families) and where nothing outside the blocks trains; elsewhere mlx-lm's checkpointing.
"""

from __future__ import annotations

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxft.models import families
from mlxft.training.fast.prefix import first_trainable_layer, supports_shared_prefix
from mlxft.training.loss import supervised_loss


def supports_blockwise(model: nn.Module, family: str) -> bool:
    """True where the model's blocks can be driven one by one (as for the shared prefix), its head
    runs at supervised positions, and only its blocks have trainable parameters."""
    if family not in families.SPARSE_HEAD or not supports_shared_prefix(model, family):
        return False
    blocks = {id(v) for layer in model.model.layers for _, v in tree_flatten(layer.trainable_parameters())}
    return all(id(v) in blocks for _, v in tree_flatten(model.trainable_parameters()))


def _random_key() -> tuple[int, int]:
    hi, lo = mx.random.state[0].tolist()
    return hi, lo


def _set_random_key(key: tuple[int, int]) -> None:
    mx.random.seed((key[0] << 32) | key[1])  # seeding with a key's 64-bit value sets that key


def block_vjp(layer: nn.Module, x: mx.array, mask, cotangent: mx.array, input_grad: bool = True):
    """(gradient at the block's input or None without `input_grad`, gradients of its trainable
    parameters) for `cotangent` at its output, the block's forward recomputed from `x`."""
    params = tree_flatten(layer.trainable_parameters())
    names = [k for k, _ in params]

    def forward(*arrays):
        inputs = arrays[0] if input_grad else x
        layer.update(tree_unflatten(list(zip(names, arrays[1:] if input_grad else arrays))))
        return layer(inputs, mask)

    primals = [x] if input_grad else []
    try:
        _, grads = mx.vjp(forward, primals + [v for _, v in params], [cotangent])
    finally:
        layer.update(tree_unflatten(params))  # the module keeps its own arrays, not the transform's
    dx, grads = (grads[0], grads[1:]) if input_grad else (None, grads)
    return dx, tree_unflatten(list(zip(names, grads)))


class BlockwiseLoss:
    """Mean cross-entropy over supervised positions (head there only) and its gradients, with the
    backward run block by block (module docstring). `head(model, h)` maps hidden states to logits."""

    def __init__(self, model: nn.Module, head):
        self.head = head
        self.first = first_trainable_layer(model)

    def _head_loss(self, model, targets, idx):
        def loss(h):
            h = model.model.norm(h)
            return supervised_loss(model, self.head, h.reshape(-1, h.shape[-1])[idx], targets.reshape(-1)[idx])

        return loss

    def loss_and_grad(self, model: nn.Module, inputs: mx.array, targets: mx.array, idx: mx.array):
        """(loss, gradients) of padded rows; the gradients have the tree of model.trainable_parameters()."""
        inner = model.model
        layers = inner.layers[self.first :]
        mask = "causal" if inputs.shape[1] > 1 else None
        h = inner.embed_tokens(inputs)
        for layer in inner.layers[: self.first]:
            h = layer(h, mask)
        saved, keys = [], []
        for layer in layers:
            saved.append(h)
            keys.append(_random_key())
            h = layer(h, mask)
            mx.eval(h)  # a segment boundary: nothing of this block's forward stays alive
        after = _random_key()
        loss, dh = mx.value_and_grad(self._head_loss(model, targets, idx))(h)
        mx.eval(loss, dh)
        grads = model.trainable_parameters()
        for i in reversed(range(len(layers))):
            _set_random_key(keys[i])
            # nothing below the first trainable block trains: no input gradient there
            dh, grads["model"]["layers"][self.first + i] = block_vjp(layers[i], saved[i], mask, dh, input_grad=i > 0)
            saved[i] = None
            mx.eval(dh, grads["model"]["layers"][self.first + i])
        _set_random_key(after)
        return loss, grads
