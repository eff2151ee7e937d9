"""A random multi-granularity loss case (model outputs + schema batch, numpy) for the loss tests,
and the worker that tests/test_multihost.py runs in each of two processes.

Worker usage: ``python tests/loss_case.py <port> <process_id> <out.npz>`` (2 processes x 4 CPU
devices; writes the global loss, metrics and gradients seen by that process).
"""

from __future__ import annotations

import numpy as np

DIMS = dict(E=8, L=6, T=3, R=4, M=3, G=4)


def make_case(seed: int, batch: int, kind: str = "softmax") -> tuple[dict, dict]:
    """``(outputs, batch)`` numpy dicts with padding, empty masks and duplicate texts.

    Text embeddings are a function of the tokens (sum of a random table), so equal texts have
    equal embeddings, as from a real text tower."""
    d = DIMS
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(d["L"], 5, d["E"])).astype(np.float32)  # per position

    def tokens(*lead):
        tok = np.zeros((*lead, d["L"]), np.int32)
        tok[..., :2] = rng.integers(1, 5, size=(*lead, 2))  # 16 distinct texts -> duplicates
        return tok

    def embed(tok):
        # identical texts -> identical embeddings; different texts -> different ones
        return table[np.arange(d["L"]), tok].sum(-2)

    b, g = batch, d["G"]
    text, tags = tokens(b), tokens(b, d["T"])
    region_text, mask_text = tokens(b, d["R"]), tokens(b, d["M"])
    xy = rng.uniform(-0.1, 0.8, size=(b, d["R"], 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, size=(b, d["R"], 2))], -1)
    area = rng.uniform(0.0, 1.0, size=(b, d["M"], g, g)) * (rng.uniform(size=(b, d["M"], g, g))
                                                             < 0.4)
    area[0, 1] = 0.0  # a valid but empty mask
    mask_valid = rng.uniform(size=(b, d["M"])) < 0.8
    mask_valid[0, 1] = True
    target = rng.integers(-1, d["M"], size=(b, g, g)).astype(np.int32)
    bt = {
        "text": text,
        "text_valid": rng.uniform(size=b) < 0.85,
        "tags": tags,
        "tags_valid": rng.uniform(size=(b, d["T"])) < 0.7,
        "region_boxes": boxes.astype(np.float32),
        "region_text": region_text,
        "region_valid": rng.uniform(size=(b, d["R"])) < 0.75,
        "mask_area": area.astype(np.float32),
        "mask_text": mask_text,
        "mask_valid": mask_valid,
        "pixel_target": target,
    }
    bt["tags_valid"][1] = False  # an image without tags
    out = {
        "img": rng.normal(size=(b, d["E"])).astype(np.float32),
        "dense": rng.normal(size=(b, g, g, d["E"])).astype(np.float32),
        "txt": embed(text),
        "tags_txt": embed(tags),
        "region_txt": embed(region_text),
        "mask_txt": embed(mask_text),
    }
    terms = ("image", "tags", "region", "mask", "pixel")
    scales = {t: np.float32(np.log(5.0 + i)) for i, t in enumerate(terms)}
    biases = {t: np.float32(-1.0 - 0.5 * i) for i, t in enumerate(terms)}
    out["scales"] = scales
    out["biases"] = biases if kind == "sigmoid" else None
    return out, bt


def loss_cfg(kind: str = "softmax", chunk_size: int = 5):
    import ml_collections as mlc

    return mlc.ConfigDict(dict(kind=kind, w_image=1.0, w_tags=0.5, w_region=1.0, w_mask=0.7,
                               w_pixel=0.3, chunk_size=chunk_size, roi_size=2,
                               roi_sampling_ratio=2))


DIFF_KEYS = ("img", "dense", "txt", "tags_txt", "region_txt", "mask_txt")


def loss_and_grads(outputs: dict, batch: dict, cfg, mesh):
    """Jitted ``umg_loss`` and its gradients w.r.t. every embedding, the scales and biases."""
    import jax

    from umg_jax.losses.umg import umg_loss

    def f(diff, rest, bt):
        return umg_loss({**diff, **rest}, bt, cfg, mesh)

    diff = {k: outputs[k] for k in DIFF_KEYS}
    diff["scales"] = outputs["scales"]
    if outputs["biases"] is not None:
        diff["biases"] = outputs["biases"]
    rest = {k: v for k, v in outputs.items() if k not in diff}
    return jax.jit(jax.value_and_grad(f, has_aux=True))(diff, rest, batch)


def _worker(port: int, pid: int, out_path: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=60)
    import ml_collections as mlc
    from jax.experimental import multihost_utils

    from umg_jax import sharding

    mesh = sharding.make_mesh(mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    results = {}
    for kind in ("softmax", "sigmoid"):
        outputs, batch = make_case(0, 16, kind)
        half = slice(pid * 8, (pid + 1) * 8)  # this process's rows
        local = {k: v[half] for k, v in outputs.items() if k in DIFF_KEYS}
        g_out = sharding.put_batch(local, mesh)
        g_out["scales"], g_out["biases"] = outputs["scales"], outputs["biases"]
        g_batch = sharding.put_batch({k: v[half] for k, v in batch.items()}, mesh)
        (total, metrics), grads = loss_and_grads(g_out, g_batch, loss_cfg(kind), mesh)
        flat = {"total": total, **{f"m_{k}": v for k, v in metrics.items()}}
        for k, v in jax.tree_util.tree_leaves_with_path(grads):
            flat["g_" + sharding.path_str(k)] = v
        for k, v in flat.items():
            results[f"{kind}/{k}"] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
    from umg_jax import train  # the trainer's host agreement on trimmed text lengths

    results["agree_max"] = np.asarray(train._agree_max((5 + pid, 9 - pid)))
    np.savez(out_path, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    import sys

    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
