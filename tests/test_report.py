"""summary and count: numbers checked against counts made by hand from the shapes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_lite as ll

KEY = jax.random.key(0)
FIRST_LINE = re.compile(
    r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| "
    r"trainable%: (\d+\.\d{4}) \(trainable (.+) of (.+)\)$"
)


@pytest.fixture(scope="module")
def tree():
    rng = np.random.default_rng(0)
    bf16 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    params = {
        "enc": {"kernel": bf16(16, 32), "bias": bf16(32)},
        "layers": {"kernel": bf16(3, 32, 32)},  # stacked
        "head": {"kernel": bf16(32, 4), "bias": bf16(4)},
    }
    config = ll.LoraConfig(
        rank=4,
        targets=("enc", "layers"),
        rank_pattern={"layers": 2},
        train=("head",),
        axes={"layers": ("stack", "in", "out")},
    )
    return params, ll.init(params, config, key=KEY)


def by_hand(params):
    base = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    adapters = 4 * (16 + 32) + 3 * 2 * (32 + 32)  # enc rank 4; three stacked layers rank 2
    head = 32 * 4 + 4
    return dict(
        trainable=adapters + head,
        total=base + adapters,
        trainable_bytes=4 * adapters + 2 * head,  # float32 factors, bf16 head
        total_bytes=2 * base + 4 * adapters,
    )


def test_count_matches_hand_count(tree):
    params, lp = tree
    assert ll.count(lp) == by_hand(params)
    assert ll.count(lp) == {
        "trainable": 708,
        "total": 4324,
        "trainable_bytes": 2568,
        "total_bytes": 9800,
    }


def test_first_line_reads_like_peft(tree):
    params, lp = tree
    expected = by_hand(params)
    first = ll.summary(lp).splitlines()[0]
    match = FIRST_LINE.match(first)
    assert match, first
    trainable, total, percent, t_bytes, all_bytes = match.groups()
    assert int(trainable.replace(",", "")) == expected["trainable"]
    assert int(total.replace(",", "")) == expected["total"]
    assert float(percent) == pytest.approx(
        100 * expected["trainable"] / expected["total"], abs=1e-4
    )
    assert (t_bytes, all_bytes) == ("2.5 KiB", "9.6 KiB")  # 2568 B and 9800 B
    assert ll.summary(lp) == first  # no table unless asked


def test_per_leaf_table_lists_paths_shapes_layouts_and_ranks(tree):
    _, lp = tree
    lines = ll.summary(lp, per_leaf=True).splitlines()
    header, rows = lines[1], lines[2:]
    for column in ("path", "shape", "rank", "trainable"):
        assert column in header
    cells = {row.split()[0]: row.split()[1:] for row in rows}
    shape = lambda text: text.replace(" ", "")
    assert len(rows) == 4
    enc = " ".join(cells["enc/kernel"])
    assert shape("(16, 32)") in shape(enc) and "in,out" in enc and enc.split()[-2:] == ["4", "192"]
    layers = " ".join(cells["layers/kernel"])
    assert "stack,in,out" in layers and layers.split()[-2:] == ["2", "384"]
    assert cells["head/kernel"][-3:] == ["full", "-", "128"]
    assert cells["head/bias"][-3:] == ["full", "-", "4"]


def test_summary_of_a_plain_tree_has_nothing_trainable():
    first = ll.summary({"w": jnp.ones((10, 10))})
    assert (
        first == "trainable params: 0 || all params: 100 || trainable%: 0.0000 "
        "(trainable 0 B of 400 B)"
    )


def test_per_leaf_table_of_each_partition(tree):
    _, lp = tree
    trainable, frozen = ll.partition(lp)
    rows = {r.split()[0]: r for r in ll.summary(trainable, per_leaf=True).splitlines()[2:]}
    assert rows["enc/kernel"].split()[-3:] == ["in,out", "4", "192"]
    assert rows["layers/kernel"].split()[-3:] == ["stack,in,out", "2", "384"]
    assert ll.summary(trainable).startswith("trainable params: 708 || all params: 708 ||")
    rows = {r.split()[0]: r for r in ll.summary(frozen, per_leaf=True).splitlines()[2:]}
    assert rows["enc/kernel"].split()[-2:] == ["-", "0"]
    assert rows["head/kernel"].split()[1:] == ["-", "full", "-", "0"]
