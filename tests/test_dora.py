"""DoRA (``LoraConfig(use_dora=True)``): ``m * V / ||V||`` with ``V = w + s A B``.

`lora` takes the norm from the factors; every case here is checked against a float64
reference that forms ``V`` densely (and, for ``detach_norm``, stops its gradient).
"""

from __future__ import annotations

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import UniqueShapes, normal, producers_of_shape
from jax import lax
from safetensors.numpy import load_file, save_file

import lorax_lite as ll
from lorax_lite import cli
from lorax_lite.weight import column_norm, factored_squares

STACKED = ll.Layout((0,), (1,), (2,))
DETACH = pytest.mark.parametrize("detach", [True, False], ids=["detached", "through-norm"])


def _conv(w, x):
    return lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))


def _scan(w, x):
    return lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]


# name: (fn, weight shape, layout, input shapes)
CASES = {
    "dense": (lambda w, x: jnp.tanh(x @ w), (64, 16), ll.Layout.dense(), [(3, 64)]),
    # DenseGeneral with two fan-in and two fan-out axes, in a mixed order.
    "dense-general": (
        lambda w, x: jnp.einsum("bhk,hokd->bod", x, w),
        (4, 3, 16, 2),
        ll.Layout((), (0, 2), (1, 3)),
        [(5, 4, 16)],
    ),
    "conv": (_conv, (3, 32, 8), ll.Layout((), (0, 1), (2,)), [(2, 9, 32)]),
    "scan-stacked": (_scan, (3, 64, 64), STACKED, [(3, 64)]),
    # A head tied to a table: x @ W.T contracts the fan-out axis; m scales the input.
    "transposed": (lambda w, x: x @ w.T, (64, 16), ll.Layout.dense(), [(3, 16)]),
    "stacked-batch": (
        lambda w, x: jnp.einsum("eti,eio->eto", x, w),
        (3, 32, 8),
        STACKED,
        [(3, 5, 32)],
    ),
}


def dora_node(shape, layout, *, detach, seed=1, rank=4, scale=0.5):
    a_shape, b_shape = layout.factor_shapes(shape, rank)
    w = normal(shape, seed, 0.3)
    m = jnp.asarray(
        np.random.default_rng(seed + 3).uniform(0.5, 2.0, layout.magnitude_shape(shape))
    )
    a, b = normal(a_shape, seed + 1, 0.3), normal(b_shape, seed + 2, 0.3)
    return ll.LoraWeight(w, a, b, scale, layout, m=m.astype(jnp.float32), detach_norm=detach)


def reference_weight64(w, a, b, m, scale, layout, detach):
    """``m * V / ||V||`` in float64 jax.numpy, ``V`` formed densely; the norm over
    fan-in axes with NumPy's axis arithmetic (no shared code with lorax_lite)."""
    letters = "abcdefghijklmnopq"[: w.ndim]
    pick = lambda axes: "".join(letters[i] for i in axes)
    stack, fan_in, fan_out = (pick(axes) for axes in layout)
    v = w + scale * jnp.einsum(f"{stack}{fan_in}z,{stack}z{fan_out}->{letters}", a, b)
    squares = jnp.sum(v * v, axis=layout.fan_in, keepdims=True)
    # A unit whose V is zero contributes zero whatever it is divided by; dividing by 1
    # there (and not differentiating sqrt at 0) keeps its output and gradients finite.
    norm = jnp.sqrt(jnp.where(squares > 0, squares, 1.0))
    if detach:
        norm = lax.stop_gradient(norm)
    return unit_array(m, layout) * v / norm


def unit_array(m, layout):
    """A ``(stack..., fan_out...)`` array in the weight's axis order, with size-1 fan-in
    axes, to broadcast against the weight."""
    letters = "abcdefghijklmnopq"
    stack, fan_out = ("".join(letters[i] for i in axes) for axes in (layout.stack, layout.fan_out))
    full = jnp.einsum(f"{stack}{fan_out}->{''.join(sorted(stack + fan_out))}", m)
    return jnp.expand_dims(full, tuple(sorted(layout.fan_in)))


def reference64(fn, node, w, args, cot):
    """Output and gradients (A, B, m) of ``fn(reference_weight64(...))`` in float64."""
    with jax.enable_x64(True):
        as64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64)
        w64, args64 = as64(w), [as64(x) for x in args]

        def run(a, b, m):
            weight = reference_weight64(w64, a, b, m, node.scale, node.layout, node.detach_norm)
            return fn(weight, *args64)

        params = (as64(node.a), as64(node.b), as64(node.m))
        out = run(*params)
        grads = jax.grad(lambda *p: (run(*p) * as64(cot)).sum(), (0, 1, 2))(*params)
        return np.asarray(out), [np.asarray(g) for g in grads]


def close(actual, expected, rtol, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def lora_outputs_and_grads(fn, node, args, cot):
    lora_fn = ll.lora(fn, strict=True)

    @jax.jit
    def run(a, b, m):
        f = lambda a, b, m: lora_fn(
            ll.LoraWeight(node.w, a, b, node.scale, node.layout, m=m, detach_norm=node.detach_norm),
            *args,
        )
        out, vjp = jax.vjp(f, a, b, m)
        return out, vjp(cot)

    return run(node.a, node.b, node.m)


@DETACH
@pytest.mark.parametrize("name", CASES)
def test_dora_matches_float64_dense_reference(name, detach):
    fn, shape, layout, in_shapes = CASES[name]
    args = [normal(s, seed=10 + i) for i, s in enumerate(in_shapes)]
    node = dora_node(shape, layout, detach=detach)
    out_shape = jax.eval_shape(lambda: ll.lora(fn)(node, *args)).shape
    cot = normal(out_shape, seed=99)
    ref_out, ref_grads = reference64(fn, node, node.w, args, cot)
    out, grads = lora_outputs_and_grads(fn, node, args, cot)
    close(out, ref_out, 1e-5, "output")
    for what, g, r in zip("ABm", grads, ref_grads):
        close(g, r, 1e-4, f"gradient of {what}")
    close(ll.lora(fn, strict=True)(node, *args), ref_out, 1e-5, "eager output")
    close(fn(node.materialize(), *args), ref_out, 1e-5, "merged weight")


def with_a_dead_unit(node):
    """``node`` with its first output unit zero in ``w`` and ``B`` (a pruned unit) and
    ``m = ||V|| = 0`` there, as `ll.init` gives it."""
    dead = np.zeros(node.layout.magnitude_shape(node.w.shape), bool)
    dead.flat[0] = True
    live = 1.0 - unit_array(jnp.asarray(dead, jnp.float32), node.layout)
    b_live = np.expand_dims(~dead, len(node.layout.stack))  # B: (stack..., r, fan_out...)
    m = jnp.where(dead, 0.0, node.m)
    return dataclasses.replace(node, w=node.w * live, b=node.b * b_live, m=m)


@DETACH
@pytest.mark.parametrize("name", CASES)
def test_a_dead_output_unit_stays_finite_and_matches_float64(name, detach):
    """A unit with ``||V|| = 0`` and ``m = 0`` (0/0) outputs zero; the other units and
    every gradient are finite and match the reference, through `lora` and the merge."""
    fn, shape, layout, in_shapes = CASES[name]
    args = [normal(s, seed=10 + i) for i, s in enumerate(in_shapes)]
    node = with_a_dead_unit(dora_node(shape, layout, detach=detach))
    assert float(jnp.abs(column_norm(node.w + node.delta(), layout)).min()) == 0.0
    cot = normal(jax.eval_shape(lambda: ll.lora(fn)(node, *args)).shape, seed=99)
    ref_out, ref_grads = reference64(fn, node, node.w, args, cot)
    out, grads = lora_outputs_and_grads(fn, node, args, cot)
    close(out, ref_out, 1e-5, "output")
    for what, g, r in zip("ABm", grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all(), f"gradient of {what}"
        close(g, r, 1e-4, f"gradient of {what}")
    merged = node.materialize()
    assert np.isfinite(np.asarray(merged)).all()
    close(fn(merged, *args), ref_out, 1e-5, "merged weight")
    dense = lambda a, b, m: fn(dataclasses.replace(node, a=a, b=b, m=m).materialize(), *args)
    for what, g, r in zip("ABm", jax.vjp(dense, node.a, node.b, node.m)[1](cot), ref_grads):
        close(g, r, 1e-4, f"gradient of {what} through the merged weight")


@DETACH
def test_the_dense_weight_has_the_same_gradients(detach):
    """`LoraWeight.materialize` (merge, and the fallback of ops with no DoRA rule) takes
    the norm densely and honours ``detach_norm`` too."""
    fn, shape, layout, in_shapes = CASES["dense-general"]
    args = [normal(in_shapes[0], seed=10)]
    node = dora_node(shape, layout, detach=detach)
    cot = normal(jax.eval_shape(lambda: fn(node.materialize(), *args)).shape, seed=99)
    _, ref_grads = reference64(fn, node, node.w, args, cot)

    def dense(a, b, m):
        return fn(dataclasses.replace(node, a=a, b=b, m=m).materialize(), *args)

    grads = jax.vjp(dense, node.a, node.b, node.m)[1](cot)
    for what, g, r in zip("ABm", grads, ref_grads):
        close(g, r, 1e-4, f"gradient of {what}")


def test_detached_and_full_gradients_differ():
    """The option changes A's and B's gradients (m's is the same): each test above
    checks the setting it ran with."""
    fn, shape, layout, in_shapes = CASES["dense"]
    args = [normal(in_shapes[0], seed=10)]
    cot = normal((3, 16), seed=99)
    grads = {
        d: lora_outputs_and_grads(fn, dora_node(shape, layout, detach=d), args, cot)[1]
        for d in (True, False)
    }
    for k in range(2):
        assert np.abs(np.asarray(grads[True][k] - grads[False][k])).max() > 1e-3
    np.testing.assert_allclose(grads[True][2], grads[False][2], rtol=1e-5)


@pytest.mark.parametrize("kind", ["int4", "nf4"])
@pytest.mark.parametrize("name", ["dense", "scan-stacked"])
def test_dora_over_a_quantized_base_matches_float64(name, kind):
    fn, shape, layout, in_shapes = CASES[name]
    args = [normal(s, seed=10 + i) for i, s in enumerate(in_shapes)]
    node = ll.quantize({"w": dora_node(shape, layout, detach=False)}, kind=kind, block=32)["w"]
    assert isinstance(node.w, ll.QuantizedWeight) and node.m is not None
    cot = normal(jax.eval_shape(lambda: ll.lora(fn)(node, *args)).shape, seed=99)
    ref_out, ref_grads = reference64(fn, node, node.w.dequantize(), args, cot)
    out, grads = lora_outputs_and_grads(fn, node, args, cot)
    close(out, ref_out, 5e-5, "output")
    for what, g, r in zip("ABm", grads, ref_grads):
        close(g, r, 1e-4, f"gradient of {what}")


def test_factored_norm_equals_dense_norm_in_float64():
    for name in ("dense-general", "conv", "scan-stacked"):
        _, shape, layout, _ = CASES[name]
        node = dora_node(shape, layout, detach=True, scale=2.0)
        dense = node.w + node.delta()
        got = jnp.sqrt(factored_squares(node.w, node.a, node.b, node.scale, node.layout))
        with jax.enable_x64(True):
            v = np.asarray(node.w, np.float64) + np.asarray(node.delta(jnp.float64))
        expected = np.sqrt((v**2).sum(axis=layout.fan_in))
        expected = np.transpose(expected, np.argsort(np.argsort(layout.stack + layout.fan_out)))
        close(got, expected, 1e-6, name)
        close(column_norm(dense, layout), expected, 1e-6, name)


# ----- init, training, merge ----------------------------------------------------------


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, 16, name="embed")(ids)
        x = nn.DenseGeneral((2, 8), name="proj")(x)
        x = nn.DenseGeneral(16, axis=(-2, -1), name="out")(jnp.tanh(x))
        x = nn.Conv(8, (3,), name="conv")(x)
        return nn.Dense(4, name="head")(x)


@pytest.fixture(scope="module")
def net():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 6)))
    params = Net().init(jax.random.key(0), ids)
    config = ll.LoraConfig(rank=2, targets=("proj", "out", "conv"), use_dora=True, train=("head",))
    tree = ll.init(params, config, key=jax.random.key(1), fn=Net().apply, args=(ids,))
    return params, config, tree, ids


def test_init_magnitude_is_the_weight_norm_and_the_model_starts_unchanged(net):
    params, _, tree, ids = net
    out = tree["params"]["out"]["kernel"]  # (2, 8, 16): fan-in (0, 1)
    assert out.layout == ll.Layout((), (0, 1), (2,)) and out.m.shape == (16,)
    w = np.asarray(params["params"]["out"]["kernel"], np.float64)
    np.testing.assert_allclose(out.m, np.sqrt((w**2).sum(axis=(0, 1))), rtol=1e-6)
    proj = tree["params"]["proj"]["kernel"]  # (16, 2, 8): fan-out (1, 2)
    w = np.asarray(params["params"]["proj"]["kernel"], np.float64)
    np.testing.assert_allclose(proj.m, np.sqrt((w**2).sum(axis=0)), rtol=1e-6)
    expected = Net().apply(params, ids)
    np.testing.assert_allclose(ll.lora(Net().apply)(tree, ids), expected, rtol=1e-5, atol=1e-6)


def test_init_over_a_dead_unit_starts_unchanged_with_finite_gradients(net):
    params, config, _, ids = net
    params = jax.tree_util.tree_map(lambda x: x, params)  # a copy to edit
    for name in ("out", "conv"):  # output unit 0 pruned: m = ||V|| = 0 there
        params["params"][name]["kernel"] = params["params"][name]["kernel"].at[..., 0].set(0.0)
    tree = ll.init(params, config, key=jax.random.key(1), fn=Net().apply, args=(ids,))
    assert float(tree["params"]["conv"]["kernel"].m[0]) == 0.0
    expected = Net().apply(params, ids)
    np.testing.assert_allclose(ll.lora(Net().apply)(tree, ids), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(Net().apply(ll.merge(tree), ids), expected, rtol=1e-5, atol=1e-6)
    trainable, frozen = ll.partition(tree)
    loss = lambda t: jnp.sum(ll.lora(Net().apply)(ll.combine(t, frozen), ids) ** 2)
    for path, g in jax.tree_util.tree_leaves_with_path(jax.grad(loss)(trainable)):
        assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)


def test_magnitude_trains_and_is_counted(net):
    _, _, tree, ids = net
    trainable, frozen = ll.partition(tree)
    assert trainable["params"]["conv"]["kernel"].m.shape == (8,)
    assert frozen["params"]["conv"]["kernel"].m is None
    magnitudes = 16 + 16 + 8  # proj (2, 8), out (16,), conv (8,)
    config = ll.LoraConfig(rank=2, targets=("proj", "out", "conv"), train=("head",))
    plain = ll.init(net[0], config, key=jax.random.key(1), fn=Net().apply, args=(ids,))
    assert ll.count(tree)["trainable"] == ll.count(plain)["trainable"] + magnitudes
    assert ll.summary(tree).startswith(f"trainable params: {ll.count(tree)['trainable']:,}")
    rows = ll.summary(tree, per_leaf=True).splitlines()
    conv = next(r for r in rows if r.startswith("params/conv/kernel"))
    assert conv.split()[-1] == f"{3 * 16 * 2 + 2 * 8 + 8:,}"  # A (3, 16, 2), B (2, 8), m (8,)

    no_m = {"params": {**tree["params"], "conv": {**tree["params"]["conv"]}}}
    no_m["params"]["conv"]["kernel"] = dataclasses.replace(tree["params"]["conv"]["kernel"], m=None)
    with pytest.raises(ValueError, match=r"params/conv/kernel: .* DoRA's m \(a partition\?\)"):
        ll.lora(Net().apply)(no_m, ids)  # not run as plain LoRA
    tx = ll.optimizer(optax.sgd(0.1), tree)
    state = tx.init(trainable)
    loss = lambda t: jnp.sum(ll.lora(Net().apply)(ll.combine(t, frozen), ids) ** 2)
    updates, _ = tx.update(jax.grad(loss)(trainable), state, trainable)
    for name in ("proj", "out", "conv"):
        assert np.abs(np.asarray(updates["params"][name]["kernel"].m)).max() > 0


def trained(tree):
    """Every adapter with a non-zero B and a DoRA magnitude moved off ``||w||``."""

    def move(node):
        if not isinstance(node, ll.LoraWeight):
            return node
        b = normal(node.b.shape, seed=node.b.size, scale=0.3)
        return dataclasses.replace(node, b=b, m=None if node.m is None else node.m * 1.5)

    return jax.tree_util.tree_map(move, tree, is_leaf=lambda x: isinstance(x, ll.LoraWeight))


def test_merge_and_unmerge(net):
    _, _, tree, ids = net
    tree = trained(tree)
    merged = ll.merge(tree)
    np.testing.assert_allclose(
        Net().apply(merged, ids), ll.lora(Net().apply)(tree, ids), rtol=1e-5, atol=1e-6
    )
    conv = tree["params"]["conv"]["kernel"]
    assert ll.unmerge(merged, tree)["params"]["conv"]["kernel"] is conv
    trainable, _ = ll.partition(tree)
    with pytest.raises(ValueError, match=r"params/conv/kernel"):
        ll.unmerge(merged, trainable)


def test_embedding_is_refused_at_init_and_in_lora(net):
    params, _, _, ids = net
    config = ll.LoraConfig(rank=2, targets=("embed",), use_dora=True)
    with pytest.raises(ValueError, match=r"params/embed/embedding: use_dora needs a matmul"):
        ll.init(params, config, key=jax.random.key(1), fn=Net().apply, args=(ids,))
    tree = ll.init(params, config, key=jax.random.key(1))  # no fn: not known at init
    with pytest.raises(ValueError, match=r"params/embed/embedding: a DoRA weight .* gather"):
        ll.lora(Net().apply)(tree, ids)


def test_quantized_init_starts_at_the_quantized_model(net):
    params, config, _, ids = net
    quantize = dict(kind="nf4", block=8)
    init = lambda c: ll.init(
        params, c, key=jax.random.key(1), fn=Net().apply, args=(ids,), quantization=quantize
    )
    tree = init(config)
    node = tree["params"]["proj"]["kernel"]
    w = np.asarray(node.w.dequantize(), np.float64)
    np.testing.assert_allclose(node.m, np.sqrt((w**2).sum(axis=0)), rtol=1e-6)
    base = Net().apply(ll.merge(init(dataclasses.replace(config, use_dora=False))), ids)
    np.testing.assert_allclose(ll.lora(Net().apply)(tree, ids), base, rtol=1e-5, atol=1e-6)


def test_slicing_fan_in_falls_back_to_the_dense_weight():
    """Rows of a DoRA weight keep the whole weight's norm: the slice materializes
    (strict mode raises) and the value is still right."""
    node = dora_node((8, 4), ll.Layout.dense(), detach=True)
    fn = lambda w, x: x @ w[:5]
    x = normal((2, 5), 3)
    with pytest.raises(ll.MaterializationError, match="slice"):
        ll.lora(fn, strict=True)(node, x)
    with pytest.warns(UserWarning, match="slice"):
        out = ll.lora(fn)(node, x)
    close(out, fn(node.materialize(), x), 1e-6)
    split = lambda w, x: x @ jnp.split(w, 2, axis=1)[1]  # columns: no fallback
    close(
        ll.lora(split, strict=True)(node, normal((2, 8), 4)),
        split(node.materialize(), normal((2, 8), 4)),
        1e-6,
    )


# ----- nothing of the weight's shape in the compiled gradient -------------------------


def weight_buffers(hlo: str, shape: tuple[int, ...]) -> list[str]:
    """The arrays of ``shape`` (any axis order) that the compiled step stores: results
    of its entry computation's instructions other than parameters (values inside a
    fusion are not stored)."""
    entry = hlo[hlo.index("\nENTRY") :]
    return [
        line for line in producers_of_shape(entry, shape, ("[a-z-]+",)) if "parameter(" not in line
    ]


def only_of_the_frozen_weight(line: str) -> bool:
    """An instruction whose one operand is the frozen base ``w`` (a transposed copy
    of the conv kernel for the input gradient, as plain LoRA has)."""
    return re.search(r"\((%[\w.]*_w\.\d+)\)", line) is not None


@DETACH
def test_compiled_gradient_forms_no_dense_weight(detach):
    """The compiled DoRA train step stores no array of a kernel's shape that depends on
    the adapter (``w + s A B``, its gradient, ``m * V / norm``), for a Dense (272, 1040)
    and a Conv (3, 1040, 13) kernel: only what plain LoRA's step stores, functions of
    the frozen ``w`` alone. The merged reference step does store such arrays. (At these
    sizes the XLA:CPU of jax >= 0.11 fuses the square of ``||w_j||^2`` into its sum; at
    tiny ones, such as (48, 80), and at every size on jax 0.10, it writes the square of
    the frozen ``w`` out first: one more buffer of the frozen weight alone.)"""

    module, x = UniqueShapes(1040), normal((4, 5, 272), 300)
    params = module.init(jax.random.key(0), x)
    apply = ll.lora(module.apply, strict=True)

    def buffers(use_dora, merged=False):
        config = ll.LoraConfig(rank=2, targets="kernel", use_dora=use_dora, dora_detach_norm=detach)
        tree = ll.init(params, config, key=jax.random.key(1), fn=module.apply, args=(x,))
        trainable, frozen = ll.partition(tree)
        run = (lambda t: module.apply(ll.merge(t), x)) if merged else (lambda t: apply(t, x))
        loss = lambda t, f: jnp.sum(run(ll.combine(t, f)) ** 2)
        hlo = jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen).compile().as_text()
        return {shape: weight_buffers(hlo, shape) for shape in ((272, 1040), (3, 1040, 13))}

    dora, lora, merged = buffers(True), buffers(False), buffers(True, merged=True)
    squares_fused = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)
    for shape in dora:
        extra = len(dora[shape]) - len(lora[shape])
        assert 0 <= extra <= (0 if squares_fused else 1), (shape, dora[shape])
        assert all(map(only_of_the_frozen_weight, dora[shape])), dora[shape]
        assert not all(map(only_of_the_frozen_weight, merged[shape])), merged[shape]


# ----- checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("detach", [True, False])
def test_save_and_load_keep_the_magnitude(net, tmp_path, detach, capsys):
    params, config, tree, ids = net
    config = dataclasses.replace(config, dora_detach_norm=detach)
    tree = trained(ll.init(params, config, key=jax.random.key(1), fn=Net().apply, args=(ids,)))
    ll.save_adapter(tmp_path / "adapter", tree, config)
    loaded = ll.load_adapter(tmp_path / "adapter", params)
    for name in ("proj", "out", "conv"):
        node, saved = loaded["params"][name]["kernel"], tree["params"][name]["kernel"]
        np.testing.assert_array_equal(node.m, saved.m)
        assert node.detach_norm is detach
    np.testing.assert_array_equal(
        ll.lora(Net().apply)(loaded, ids), ll.lora(Net().apply)(tree, ids)
    )
    alone = ll.load_adapter(tmp_path / "adapter")
    np.testing.assert_array_equal(
        alone["params"]["out"]["kernel"].m, tree["params"]["out"]["kernel"].m
    )
    info = ll.adapter_metadata(tmp_path / "adapter")
    assert info["config"]["use_dora"] is True
    assert [e["m"]["shape"] for e in info["adapters"]] == [[8], [16], [2, 8]]
    assert cli.main(["inspect", str(tmp_path / "adapter")]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("params/conv"))
    assert row.split()[-1] == f"{3 * 16 * 2 + 2 * 8 + 8:,}"  # A, B and m


# ----- PEFT format (PEFT itself: tests/test_peft.py, make interop) ----------------------


def dense_tree(use_dora=True):
    rng = np.random.default_rng(0)
    layer = lambda: {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)}
    params = {"params": {"query": layer(), "value": layer()}}
    config = ll.LoraConfig(rank=2, alpha=4, targets=("query", "value"), use_dora=use_dora)
    return params, config, trained(ll.init(params, config, key=jax.random.key(1)))


NAMES = {"params/query/kernel": "attn.query", "params/value/kernel": "attn.value"}


def test_to_peft_writes_the_magnitude_and_from_peft_reads_it(tmp_path):
    params, config, tree = dense_tree()
    ll.to_peft(tmp_path, tree, config, NAMES)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.attn.query.lora_magnitude_vector"
    np.testing.assert_array_equal(tensors[key], tree["params"]["query"]["kernel"].m)
    assert tensors["base_model.model.attn.query.lora_B.weight"].shape == (6, 2)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    back = ll.from_peft(tmp_path, params, NAMES)
    for name in ("query", "value"):
        node, saved = back["params"][name]["kernel"], tree["params"][name]["kernel"]
        for field in "abm":
            np.testing.assert_array_equal(getattr(node, field), getattr(saved, field))
        assert node.detach_norm and node.scale == saved.scale


def test_peft_refusals_name_the_module(tmp_path):
    params, config, tree = dense_tree()
    plain = dense_tree(use_dora=False)[2]
    mixed = {"params": {"query": tree["params"]["query"], "value": plain["params"]["value"]}}
    with pytest.raises(ValueError, match=r"DoRA adapters \(params/query/kernel\) and plain"):
        ll.to_peft(tmp_path, mixed, config, NAMES)
    ll.to_peft(tmp_path, tree, config, NAMES)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.model.attn.value.lora_magnitude_vector"]
    tensors["base_model.model.attn.query.lora_magnitude_vector"] = np.ones(5, np.float32)
    save_file(tensors, weights)
    with pytest.raises(ValueError) as err:
        ll.from_peft(tmp_path, params, NAMES)
    assert "attn.value: use_dora is true but lora_magnitude_vector is missing" in str(err.value)
    assert "attn.query.lora_magnitude_vector: shape (5,), expected (6,)" in str(err.value)
    ll.to_peft(tmp_path, plain, config, NAMES, overwrite=True)
    tensors = load_file(weights)
    tensors["base_model.model.attn.query.lora_magnitude_vector"] = np.ones(6, np.float32)
    tensors["base_model.model.other.lora_magnitude_vector"] = np.ones(6, np.float32)
    save_file(tensors, weights)
    with pytest.raises(ValueError) as err:
        ll.from_peft(tmp_path, params, NAMES)
    assert (
        "attn.query.lora_magnitude_vector: present, but adapter_config.json has use_dora false"
        in str(err.value)
    )
    assert "other.lora_magnitude_vector: lora_magnitude_vector of a module with no lora_A" in str(
        err.value
    )


def test_adapter_sets_refuse_dora_adapters():
    params, _, tree = dense_tree()
    with pytest.raises(ValueError, match=r"params/query/kernel: a DoRA adapter"):
        ll.AdapterSet.from_trees({"one": tree, "two": tree}, base=params)
