"""Image <-> text retrieval over the evaluated examples (R@1/5/10 both directions).

Each example contributes its image and its caption (``text``, the first caption in eval mode);
examples without a caption contribute only their image (a distractor for t2i).
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
        txt = normalize(np.asarray(enc.encode_text(toks[valid]), np.float32))
        out = metrics.retrieval_recall(img, txt, np.nonzero(valid)[0])
        out["count"] = float(len(img))
        return out
