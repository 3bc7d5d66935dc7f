"""PyTorch module names of the Flax BERT in `experiments.models.bert`, for the PEFT format.

``ll.to_peft(dir, tree, config, peft_name_map())`` writes an adapter that PEFT
loads onto a Hugging Face ``BertModel``; ``ll.from_peft(dir, params,
peft_name_map())`` reads one back. The names come from `bert.torch_names`, the
same table that loads the PyTorch checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from experiments.models.bert import BertConfig, torch_names


def peft_name_map(*, torch_prefix: str = "", classifier: str = "classifier") -> Callable:
    """A name map ``lorax_lite leaf path -> torch module name`` for `BertEncoder`/`BertClassifier`.

    Accepts paths with or without the ``params`` collection and the ``bert``
    submodule of `BertClassifier` (``params/bert/layer_0/attention/query/kernel``
    -> ``encoder.layer.0.attention.self.query``).

    Args:
        torch_prefix: prepended to encoder module names, e.g. ``"bert."`` for the
            encoder inside ``BertForSequenceClassification``.
        classifier: the torch module name of the `BertClassifier` head.

    Returns:
        A function returning the module name, or None for a leaf it does not know.
    """

    def name(path: str) -> str | None:
        parts = path.split("/")
        parts = parts[1:] if parts[:1] == ["params"] else parts
        if parts[:1] == ["classifier"]:
            return classifier
        parts = parts[1:] if parts[:1] == ["bert"] else parts
        layers = [int(p[len("layer_") :]) for p in parts if re.fullmatch(r"layer_\d+", p)]
        table = torch_names(BertConfig(num_layers=max(layers, default=0) + 1))
        entry = table.get(tuple(parts))
        return torch_prefix + entry[0].rpartition(".")[0] if entry else None

    return name
