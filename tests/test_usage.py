"""infer_usage: each weight's kind and layout, read from an abstract trace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Stacked

from lorax_lite.usage import Usage, infer_usage, split_static
from lorax_lite.weight import Layout

X = jax.ShapeDtypeStruct((2, 3, 16), jnp.float32)
IDS = jax.ShapeDtypeStruct((2, 3), jnp.int32)


def shapes_of(model, *args):
    """Parameter shapes without running the initializers."""
    return jax.eval_shape(lambda *xs: model.init(jax.random.key(0), *xs), *args)


class Layers(nn.Module):
    @nn.compact
    def __call__(self, x, ids):
        h = nn.Dense(8, name="dense")(x)
        q = nn.DenseGeneral((4, 2), name="qkv")(h)  # kernel (in, heads, head_dim)
        o = nn.DenseGeneral(16, axis=(-2, -1), name="out")(q)  # kernel (heads, head_dim, out)
        c = nn.Conv(5, (3,), name="conv")(o)  # kernel (width, in, out)
        return c.sum() + nn.Embed(50, 5, name="emb")(ids).sum()


@pytest.fixture(scope="module")
def layer_usage():
    params = shapes_of(Layers(), X, IDS)
    return infer_usage(Layers().apply, params, (X, IDS))


@pytest.mark.parametrize(
    "path, kind, layout",
    [
        ("params/dense/kernel", "dot", Layout((), (0,), (1,))),
        ("params/qkv/kernel", "dot", Layout((), (0,), (1, 2))),
        ("params/out/kernel", "dot", Layout((), (0, 1), (2,))),
        ("params/conv/kernel", "conv", Layout((), (0, 1), (2,))),
        ("params/emb/embedding", "gather", Layout((), (0,), (1,))),
    ],
)
def test_flax_layers(layer_usage, path, kind, layout):
    assert layer_usage[path] == Usage(kind, layout)


def test_biases_are_not_reported(layer_usage):
    assert not any(p.endswith("bias") for p in layer_usage)


def test_conv_2d_hwio():
    model = nn.Conv(6, (3, 3))
    x = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)
    usage = infer_usage(model.apply, shapes_of(model, x), (x,))
    assert usage["params/kernel"] == Usage("conv", Layout((), (0, 1, 2), (3,)))


def test_nn_scan_stacked_kernel():
    params = shapes_of(Stacked(16, act=None), X)
    assert params["params"]["layers"]["fc"]["kernel"].shape == (3, 16, 16)
    usage = infer_usage(Stacked(16, act=None).apply, params, (X,))
    assert usage["params/layers/fc/kernel"] == Usage("dot", Layout((0,), (1,), (2,)))


def test_lax_scan_with_stack_axis_after_transpose():
    # A (in, layers, out) weight, transposed so that scan slices the layer axis.
    def fn(params, x):
        w = jnp.transpose(params["w"], (1, 0, 2))
        return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]

    params = {"w": jax.ShapeDtypeStruct((4, 3, 4), jnp.float32)}
    usage = infer_usage(fn, params, (jax.ShapeDtypeStruct((2, 4), jnp.float32),))
    assert usage["w"] == Usage("dot", Layout((1,), (0,), (2,)))


def test_weights_inside_cond_and_while():
    def fn(params, x, flag):
        y = jax.lax.cond(flag, lambda v: v @ params["c"], lambda v: -(v @ params["c"]), x)

        def body(carry):
            i, h = carry
            return i + 1, jnp.tanh(h @ params["loop"].T)

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, y))[1]

    params = {"c": jnp.zeros((5, 4)), "loop": jnp.zeros((4, 4))}
    usage = infer_usage(fn, params, (jnp.zeros((2, 5)), jnp.array(True)))
    assert usage["c"] == Usage("dot", Layout.dense())
    # h @ loop.T contracts the weight's axis 1: an (out, in) weight.
    assert usage["loop"] == Usage("dot", Layout((), (1,), (0,)))


def test_jit_and_remat_are_entered_and_weight_on_the_right():
    @jax.jit
    def inner(x, w):
        return jax.checkpoint(lambda x, w: jnp.einsum("bi,oi->bo", x, w))(x, w)

    usage = infer_usage(
        lambda p, x: inner(x, p["w"]), {"w": jnp.zeros((3, 5))}, (jnp.ones((2, 5)),)
    )
    assert usage["w"] == Usage("dot", Layout((), (1,), (0,)))


def test_unused_and_elementwise_weights_are_absent():
    params = {"w": jnp.zeros((3, 3)), "gain": jnp.zeros((3, 3)), "unused": jnp.zeros((2, 2))}
    usage = infer_usage(lambda p, x: (x @ p["w"]) * p["gain"], params, (jnp.ones((3, 3)),))
    assert set(usage) == {"w"}


def test_static_arguments_pass_through_the_trace():
    def fn(params, x, *, train):
        return x @ params["w"] if train else x

    usage = infer_usage(
        lambda p, x, train: fn(p, x, train=train), {"w": jnp.zeros((3, 2))}, (jnp.ones(3), True)
    )
    assert usage["w"].kind == "dot"
    dynamic, rebuild, (_, static) = split_static((np.ones(2), True, "relu"))
    assert len(dynamic) == 1 and static[1:] == (True, "relu")
    assert rebuild([np.zeros(2)])[1:] == (True, "relu")
