"""What many test files share: random inputs, the small Flax models, the eager/jit mark,
tree fixtures-as-functions, a norm-wise tree comparison and HLO inspection."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
import signal
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_lite as ll
from lorax_lite.weight import is_lora_node

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def normal(shape, seed=0, scale=1.0, dtype=jnp.float32) -> jax.Array:
    """Random data drawn with numpy, so that making test inputs compiles nothing."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


# ----- small Flax models -------------------------------------------------------------


class MLP(nn.Module):
    """Dense layers of widths ``features`` named ``names``, ``act`` between them."""

    features: Sequence[int]
    names: Sequence[str]
    act: Callable[[jax.Array], jax.Array] = jnp.tanh

    @nn.compact
    def __call__(self, x):
        for i, (width, name) in enumerate(zip(self.features, self.names)):
            x = nn.Dense(width, name=name)(x)
            x = self.act(x) if i + 1 < len(self.features) else x
        return x


class StackedLayer(nn.Module):
    """One scanned layer: a Dense named ``fc``, then ``act`` (none when None)."""

    width: int
    act: Callable[[jax.Array], jax.Array] | None = jnp.tanh

    @nn.compact
    def __call__(self, x, _):
        x = nn.Dense(self.width, name="fc")(x)
        return (x if self.act is None else self.act(x)), None


class Stacked(nn.Module):
    """Three scanned layers (``layers/fc``): every kernel has a leading layer (stacked) axis."""

    width: int
    act: Callable[[jax.Array], jax.Array] | None = jnp.tanh

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            StackedLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return scan(self.width, self.act, name="layers")(x, None)[0]


class Block(nn.Module):
    """A transformer block: Embed, LayerNorm, attention projections as DenseGeneral with
    3-D kernels (two output axes for q/k/v, two contracting axes for the output), a
    Dense MLP and the embedding tied as the output head."""

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(11, 8)
        h = embed(ids)
        y = nn.LayerNorm()(h)
        q, k, v = (nn.DenseGeneral((2, 4), name=n)(y) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits), v)
        h = h + nn.DenseGeneral(8, axis=(-2, -1), name="out")(att)
        y = nn.LayerNorm()(h)
        h = h + nn.Dense(8)(nn.gelu(nn.Dense(16)(y)))
        return embed.attend(nn.LayerNorm()(h))


class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(6)(jnp.tanh(nn.Dense(12)(h))), None


class ScanModel(nn.Module):
    """Scan over layers with remat: kernels stacked on a leading axis."""

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        return nn.Dense(2)(layers()(x, None)[0])


IDS = lambda: jnp.array([[1, 2, 3, 4], [0, 5, 5, 10]])  # noqa: E731 - Block's input
SEQ = lambda: normal((2, 4, 6), 200)  # noqa: E731 - ScanModel's input


class UniqueShapes(nn.Module):
    """Targeted kernels of shapes found nowhere else: Dense (in, hidden), Conv (3, hidden, 13)."""

    hidden: int

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden, name="up")(x))
        return nn.Conv(13, (3,), name="conv")(h)


# ----- trees and compiled steps ------------------------------------------------------


def assert_trees_close_at_scale(actual: Any, expected: Any, *, rtol: float, atol: float):
    """``chex.assert_trees_all_close`` with each leaf's tolerance relative to its largest
    magnitude: max |actual - expected| <= atol + rtol * max |expected|, in float64, and
    finite. For results whose small entries carry the rounding of their large ones (bf16
    products, long reductions), which chex's element-wise bound would hold too tight."""
    chex.assert_trees_all_equal_structs(actual, expected)
    chex.assert_tree_all_finite((actual, expected))
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        chex.assert_equal_shape((a, e))
        scale = np.abs(e).max(initial=0.0)
        chex.assert_trees_all_close(a, e, rtol=0.0, atol=atol + rtol * scale)


def randomize_b(tree: Any, key: jax.Array, std: float = 0.5) -> Any:
    """Gives every adapter a non-zero B, so that adapters change the model's output."""
    nodes, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_lora_node)
    keys = iter(jax.random.split(key, len(nodes)))
    out = []
    for node in nodes:
        k = next(keys)
        if isinstance(node, ll.LoraWeight):
            b = std * jax.random.normal(k, node.b.shape, node.b.dtype)
            node = dataclasses.replace(node, b=b)
        out.append(node)
    return jax.tree_util.tree_unflatten(treedef, out)


def dense_reference(node: ll.LoraWeight) -> np.ndarray:
    """``w + scale * A @ B`` in float64 numpy, by einsum over the layout's axis roles."""
    w = np.asarray(node.w, np.float64)
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    letters = "abcdefghijklmnopqrstuvwxy"[: w.ndim]
    pick = lambda axes: "".join(letters[i] for i in axes)
    stack, fan_in, fan_out = (pick(axes) for axes in node.layout)
    delta = np.einsum(f"{stack}{fan_in}z,{stack}z{fan_out}->{letters}", a, b)
    return w + node.scale * delta


def producers_of_shape(hlo: str, shape: tuple[int, ...], ops: tuple[str, ...]) -> list[str]:
    """HLO instructions whose op is one of ``ops`` and whose result has ``shape``'s
    dimensions in any order (XLA may lay a weight gradient out transposed)."""
    shapes = "|".join(",".join(map(str, dims)) for dims in set(itertools.permutations(shape)))
    pattern = re.compile(rf"= [a-z0-9]+\[({shapes})\](\{{[^}}]*\}})? ({'|'.join(ops)})\(")
    return [line.strip() for line in hlo.splitlines() if pattern.search(line)]


def train_step_hlo(loss, trainable, *args) -> str:
    step = jax.jit(jax.value_and_grad(loss))
    return step.lower(trainable, *args).compile().as_text()


def all_eqns(jaxpr) -> Any:
    """The equations of ``jaxpr`` and of every jaxpr inside them (a product under the
    ``jax.checkpoint`` of a cast base, a scan's body), depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for inner in jex.jaxprs_in_params(eqn.params):
            yield from all_eqns(inner)


def grad_and_temp_bytes(model, tree, x) -> tuple[Any, int | None]:
    """The value and the gradients of ``ll.lora(model)`` with respect to the trainable
    leaves, and the compiled gradient's temporary bytes (None where not reported)."""
    apply = ll.lora(model, strict=True)
    trainable, frozen = ll.partition(tree)
    grad = jax.jit(jax.value_and_grad(lambda t, f, x: apply(ll.combine(t, f), x)))
    analysis = grad.lower(trainable, frozen, x).compile().memory_analysis()
    return grad(trainable, frozen, x), (analysis and analysis.temp_size_in_bytes)


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises ``TimeoutError`` in the block once ``seconds`` have passed (SIGALRM; the main
    thread only), so that a hang fails the test instead of stalling the suite."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
