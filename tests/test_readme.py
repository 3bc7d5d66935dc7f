"""The README's quickstart runs as written and really trains."""

import contextlib
import io
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

import lorax_lite as ll

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    match = re.search(r"^## Quickstart\n+```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert match, "README.md has no ```python block under '## Quickstart'"
    return match.group(1)


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
