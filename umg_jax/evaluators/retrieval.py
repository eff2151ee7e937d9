"""Image <-> text retrieval over the evaluated examples (R@1/5/10 both directions).

Each example contributes its image and its caption (``text``, the first caption in eval mode);
examples without a caption contribute only their image (a distractor for t2i). Identical captions
(the same token row, e.g. the synthetic world's "a square on water by a wall." of several scenes)
are one text: each distinct row is encoded once, in a fixed (sorted) order, so the embeddings and
the metrics depend neither on the batches nor on float noise between copies; see
``metrics.retrieval_recall`` for the i2t gallery of distinct texts and the rule for ties.
"""

from __future__ import annotations

import numpy as np

from umg_jax.evaluators import metrics
from umg_jax.evaluators.common import Evaluator, normalize


class Retrieval(Evaluator):
    name = "retrieval"
    needs = ("text", "text_valid")

    def compute(self, enc, batches):
        img = np.concatenate([b["img_emb"] for b in batches])
        toks = np.concatenate([b["text"] for b in batches])
        valid = np.concatenate([b["text_valid"] for b in batches]).astype(bool)
        if not valid.any():
            raise ValueError("retrieval: no example has a caption")
        rows, text_id = np.unique(toks[valid], axis=0, return_inverse=True)
        text_id = text_id.reshape(-1)
        emb = normalize(np.asarray(enc.encode_text(rows), np.float32))  # [U, E]
        out = metrics.retrieval_recall(img, emb[text_id], np.nonzero(valid)[0], txt_id=text_id)
        out["count"] = float(len(img))
        return out
