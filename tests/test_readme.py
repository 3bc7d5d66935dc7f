"""The README's quickstart runs as written and really trains, and the docs' how-to blocks that
continue it (moved there from the README) do what they say."""

import contextlib
import io
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_lite as ll

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HOWTO = ROOT / "docs" / "howto"


def section_code(title: str, source: pathlib.Path = README) -> str:
    """The first ```python block of the section ``title`` (a ``#`` or ``##`` heading) of
    ``source``."""
    pattern = rf"^##? {re.escape(title)}\n.*?^```python\n(.*?)^```"
    match = re.search(pattern, source.read_text(), re.S | re.M)
    assert match, f"{source.name} has no ```python block under '{title}'"
    return match.group(1)


def quickstart_code() -> str:
    return section_code("Quickstart")


@pytest.fixture(scope="module")
def quickstart():
    """The namespace the quickstart leaves behind, with its printed text under ``"stdout"``."""
    namespace = {"__name__": "readme_quickstart"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(quickstart_code(), str(README), "exec"), namespace)
    return {**namespace, "stdout": stdout.getvalue()}


def mse(namespace, params):
    model, x, y = namespace["model"], namespace["x"], namespace["y"]
    return float(jnp.mean((model.apply(params, x) - y) ** 2))


def test_quickstart_fits_and_the_untrained_model_does_not(quickstart):
    untrained = mse(quickstart, quickstart["params"])
    final = float(quickstart["loss"])
    assert untrained > 0.2
    assert final < 0.05
    assert mse(quickstart, quickstart["merged"]) < 0.05  # the merged params are the trained model


def test_quickstart_prints_summary_and_final_loss(quickstart):
    out = quickstart["stdout"]
    assert out.startswith("trainable params: ")
    printed = re.search(r"final loss (\d+\.\d+)", out)
    assert printed and float(printed.group(1)) == pytest.approx(float(quickstart["loss"]), abs=1e-4)


def test_merged_params_reproduce_the_lora_model(quickstart):
    trained = ll.combine(quickstart["trainable"], quickstart["frozen"])
    lazy = ll.lora(quickstart["model"].apply)(trained, quickstart["x"])
    merged = quickstart["model"].apply(quickstart["merged"], quickstart["x"])
    np.testing.assert_allclose(merged, lazy, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def many_adapters(quickstart):
    """The namespace after the "Many adapters" block, run on the quickstart's namespace."""
    namespace = {k: v for k, v in quickstart.items() if k != "stdout"}
    with contextlib.redirect_stdout(io.StringIO()):
        page = HOWTO / "many_adapters.md"
        exec(
            compile(section_code("Many adapters over one base", page), str(page), "exec"), namespace
        )
    return namespace


def test_many_adapters_block_selects_routes_and_combines(many_adapters):
    ns = many_adapters
    model, x = ns["model"], ns["x"]
    base = np.asarray(model.apply(ns["params"], x))
    tuned = np.asarray(model.apply(ll.merge(ns["tuned"]), x))
    fresh = np.asarray(model.apply(ll.merge(ns["fresh"]), x))
    assert np.abs(tuned - fresh).max() > 0.1  # the two adapters really differ
    np.testing.assert_allclose(ns["y_sine"], tuned, rtol=1e-4, atol=1e-5)
    ids = np.asarray(ns["ids"])[:, None]
    expected = np.where(ids == -1, base, np.where(ids == 0, tuned, fresh))
    np.testing.assert_allclose(ns["y_mixed"], expected, rtol=1e-4, atol=1e-5)
    # cat is exact: each exported leaf is the weighted sum of the two merged models' leaves.
    halves = jax.tree_util.tree_map(
        lambda s, f: 0.5 * np.asarray(s, np.float64) + 0.5 * np.asarray(f, np.float64),
        ll.merge(ns["tuned"]),
        ll.merge(ns["fresh"]),
    )
    jax.tree_util.tree_map(
        lambda e, h: np.testing.assert_allclose(e, h, rtol=1e-5, atol=1e-6), ns["export"], halves
    )


def test_quantized_base_section_runs_on_the_quickstart(quickstart):
    """The QLoRA example runs on the quickstart's tree and computes LoRA over the
    dequantized base."""
    namespace = dict(quickstart)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        page = HOWTO / "quantize.md"
        exec(compile(section_code("Quantize the base (QLoRA)", page), str(page), "exec"), namespace)
    assert stdout.getvalue().startswith("quantized base: 2 weights (nf4)")
    q_params, x = namespace["q_params"], namespace["x"]
    reference = namespace["model"].apply(ll.merge(q_params), x)
    np.testing.assert_allclose(namespace["out"], reference, rtol=1e-4, atol=1e-5)


def test_variants_section_runs_on_the_quickstart(quickstart):
    """PiSSA leaves the model unchanged at step 0, LoRA+ trains it, and the MoE adapter's
    output equals each row through its expert's merged weight (float64)."""
    ns = {k: v for k, v in quickstart.items() if k != "stdout"}
    page = HOWTO / "variants.md"
    exec(compile(section_code("PiSSA, OLoRA, LoRA+ and MoE experts", page), str(page), "exec"), ns)
    model, x = ns["model"], ns["x"]
    np.testing.assert_allclose(ns["start"], model.apply(ns["params"], x), rtol=1e-5, atol=1e-5)
    kernel = ns["pissa_params"]["params"]["fc1"]["kernel"]
    assert np.abs(np.asarray(kernel.b)).max() > 0  # PiSSA's B is not zero
    assert mse(ns, ll.merge(ns["state_plus"].tree)) < 0.1 * mse(ns, ns["params"])

    node = ns["moe_lora"]["experts"]
    assert node.a.shape == (4, 8, 2) and node.b.shape == (4, 2, 16)
    merged = np.asarray(node.w, np.float64) + node.scale * np.einsum(
        "eir,ero->eio", np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    )
    expert = np.repeat(np.arange(4), np.asarray(ns["sizes"]))
    rows = np.asarray(x, np.float64)
    expected = np.stack([rows[t] @ merged[e] for t, e in enumerate(expert)])
    np.testing.assert_allclose(
        np.asarray(ns["moe_out"], np.float64), expected, rtol=1e-5, atol=1e-5
    )


def test_dora_section_trains_on_the_quickstart(quickstart):
    """The DoRA block continues the quickstart: m has one entry per output unit, it
    trains, and the trained model fits."""
    namespace = {k: v for k, v in quickstart.items() if k != "stdout"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        page = HOWTO / "variants.md"
        exec(
            compile(section_code("DoRA (weight-decomposed LoRA)", page), str(page), "exec"),
            namespace,
        )
    assert stdout.getvalue().startswith("(64,)")
    tree = namespace["dora_params"]
    fc1 = tree["params"]["fc1"]["kernel"]
    w = np.asarray(fc1.w, np.float64)
    assert np.abs(np.asarray(fc1.m) - np.sqrt((w**2).sum(axis=0))).max() > 1e-3  # m trained
    assert float(namespace["loss"]) < 0.05
    merged = namespace["model"].apply(ll.merge(tree), namespace["x"])
    lazy = ll.lora(namespace["model"].apply)(tree, namespace["x"])
    np.testing.assert_allclose(merged, lazy, rtol=1e-4, atol=1e-5)
