"""Fixtures the experiments' tests share."""

import pytest


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A tiny Llama GGUF file in SmolLM2's format (`test_llama.write_tiny_gguf`)."""
    pytest.importorskip("gguf", reason="the gguf package writes the tiny GGUF file")
    pytest.importorskip("tokenizers", reason="the GGUF tokenizer is built with tokenizers")
    from test_llama import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path
