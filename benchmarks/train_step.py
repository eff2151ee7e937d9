"""Train-step speed: our jitted step vs open_clip's PyTorch step, same architecture and batch.

    python benchmarks/train_step.py [--models tiny,b16] [--steps 4] [--batch 16]

For each model: our step (``umg_jax.step.make_train_step`` on a 1-device mesh, AdamW) with the
CLIP-only loss (image <-> caption; comparable to open_clip) in float32 and in bfloat16
(``model.dtype``; on XLA:CPU the towers' dense layers and attention take the native-bf16 custom
VJPs of ``umg_jax.ops``), and with the full UMG loss (tags, regions, masks, pixels), float32,
with every token column used and (``--lengths``) with real
text lengths trimmed as the trainer does (``data.trim_text``; the "trimmed" ratio is UMG / CLIP
both trimmed); and open_clip's ``CLIP`` of the same shapes with its
``ClipLoss`` and ``torch.optim.AdamW``, float32 and bf16 autocast. Random inputs of the batch
contract. 2 warm-up steps, then ``--steps`` timed steps (median). MFU = analytic model FLOPs
(``umg_jax.metrics.clip_train_flops``) / step time / ``--peak`` (default: measured at start by
``umg_jax.metrics.measure_peak_flops``, fp32; the bf16 MFU against the measured bf16 peak).
Prints a table, writes
``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import peers
from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ("configs/tiny.py", {}),
    "b16": ("configs/vit_b16.py", {}),
}


def _config(name: str, batch: int, umg: bool, overrides: dict | None = None):
    from umg_jax import config_lib

    path, over = MODELS[name]
    c = config_lib.load_config(str(ROOT / path))
    c.batch_size = batch
    c.mesh.data = 1
    c.model.remat = False
    c.model.scan = False
    c.model.dtype = "float32"
    if not umg:
        c.loss.update(w_tags=0.0, w_region=0.0, w_mask=0.0, w_pixel=0.0)
    for k, v in {**over, **(overrides or {})}.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _texts(rng, shape: tuple[int, ...], length: int):
    """CLIP-tokenised rows of ``shape [..., L]``: <start>, random ids, <end>, zero padding; each
    text has between ``length // 2`` and ``length`` tokens (``length >= L``: all of L)."""
    import numpy as np

    out = np.zeros(shape, np.int32)
    flat = out.reshape(-1, shape[-1])
    n = rng.integers(max(3, min(length, shape[-1]) // 2), min(length, shape[-1]) + 1, len(flat))
    for row, k in zip(flat, n, strict=True):
        row[0], row[1:k - 1], row[k - 1] = 49406, rng.integers(1, 400, k - 2), 49407
    return out


def time_ours(name: str, batch: int, steps: int, umg: bool, overrides: dict | None = None,
              phrases: int = 0, lengths: tuple[int, int] | None = None) -> dict:
    """``phrases > 0``: tag / region / mask texts drawn from a pool of that many distinct
    phrases (like a tag vocabulary), so text de-duplication has something to find.
    ``lengths``: captions / element texts of at most that many tokens, and the batch trimmed as
    the trainer does (``step.trim_text``); else every column of every text is used."""
    import jax
    import numpy as np

    from umg_jax import metrics, optim, sharding
    from umg_jax import step as step_lib
    from umg_jax.data import schema
    from umg_jax.models import clip

    c = _config(name, batch, umg, overrides)
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
    tx, _ = optim.make_optimizer(c.optim, clip.abstract_params(c.model), 1000)
    state_sh = step_lib.state_shardings(step_lib.abstract_state(c, tx), mesh)
    shapes = schema.batch_shapes_from_config(c)
    fn = step_lib.make_train_step(clip.build_model(c.model), tx, c, mesh, state_sh, shapes)
    state = jax.jit(lambda k: step_lib.init_state(clip.init_params(c.model, k), tx),
                    out_shardings=state_sh)(jax.random.key(0))
    rng = np.random.default_rng(0)
    host = {}
    for k, (s, d) in shapes.items():
        if d == np.float32:
            host[k] = rng.normal(size=s).astype(d) if k == "image" else rng.random(s).astype(d)
        elif d == np.bool_:
            host[k] = np.ones(s, bool)
        else:
            host[k] = rng.integers(1, 400, s).astype(d)
    host["pixel_target"] = rng.integers(0, c.data.max_masks, shapes["pixel_target"][0]).astype(
        np.int32)
    if lengths:
        host["text"] = _texts(rng, shapes["text"][0], lengths[0])
    if phrases:
        le = shapes["tags"][0][-1]
        pool = (_texts(rng, (phrases, le), lengths[1]) if lengths
                else rng.integers(1, 400, (phrases, le)).astype(np.int32))
        for k in ("tags", "region_text", "mask_text"):
            host[k] = pool[rng.integers(0, phrases, shapes[k][0][:-1])]
    elif lengths:
        for k in ("tags", "region_text", "mask_text"):
            host[k] = _texts(rng, shapes[k][0], lengths[1])
    text_len = None
    if lengths:
        text_len = step_lib.text_lengths(host)
        host = step_lib.trim_text(host, text_len)
    batch_arr = sharding.put_batch(host, mesh)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        state, m = fn(state, batch_arr)
        jax.block_until_ready(m["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    flops = metrics.clip_train_flops(c.model, batch, step_lib.texts_per_example(c, text_len))
    return {"step_s": t, "img_s": batch / t, "flops": flops, "text_lengths": text_len}


def time_open_clip(name: str, batch: int, steps: int, bf16: bool) -> dict | None:
    try:
        torch = peers.torch()  # this environment's torchvision shim first
        import open_clip
    except Exception as e:  # noqa: BLE001 - optional peer
        return {"error": f"open_clip unavailable: {e}"}
    c = _config(name, batch, umg=False)
    m = c.model
    vision = open_clip.CLIPVisionCfg(layers=m.vision.layers, width=m.vision.width,
                                     head_width=m.vision.width // m.vision.heads,
                                     patch_size=m.vision.patch_size, image_size=m.vision.image_size)
    text = open_clip.CLIPTextCfg(context_length=m.text.context_length, vocab_size=m.text.vocab_size,
                                 width=m.text.width, heads=m.text.heads, layers=m.text.layers)
    model = open_clip.CLIP(m.embed_dim, vision, text, quick_gelu=m.act == "quick_gelu")
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    img = torch.randn(batch, 3, m.vision.image_size, m.vision.image_size)
    txt = torch.randint(1, 400, (batch, m.text.context_length))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            f_img, f_txt, scale = model(img, txt)
            loss = loss_fn(f_img, f_txt, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"step_s": t, "img_s": batch / t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,b16")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", default="tiny=32,b16=8", help="per-model batch, name=size,...")
    ap.add_argument("--peak", type=float, default=-1.0,
                    help="FLOP/s for MFU (-1 = measure the fp32 matmul peak first)")
    ap.add_argument("--dedup", type=float, default=0.25,
                    help="also time the UMG step with loss.text_dedup_frac=DEDUP (0 = skip)")
    ap.add_argument("--phrases", type=int, default=200,
                    help="distinct tag / region / mask phrases in the UMG batches")
    ap.add_argument("--lengths", default="20,8",
                    help="caption,element text lengths (tokens) of the trimmed rows (COCO "
                    "captions ~10-20, tag prompts / region phrases <= 8); '' = skip them")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_step.json"))
    args = ap.parse_args(argv)
    from umg_jax import metrics

    load_before = os.getloadavg()

    if args.peak < 0:
        args.peak = metrics.measure_peak_flops()
        print(f"fp32 matmul peak: {args.peak / 1e9:.0f} GFLOP/s (measured)", flush=True)
    peak_bf16 = metrics.measure_peak_flops(dtype="bfloat16")
    print(f"bf16 matmul peak: {peak_bf16 / 1e9:.0f} GFLOP/s (measured)", flush=True)
    batches = dict(kv.split("=") for kv in args.batch.split(","))
    rows = []
    for name in args.models.split(","):
        b = int(batches.get(name, 8))
        ours_clip = time_ours(name, b, args.steps, umg=False)
        ours_bf16 = time_ours(name, b, args.steps, umg=False,
                              overrides={"model.dtype": "bfloat16"})
        ours_umg = time_ours(name, b, args.steps, umg=True, phrases=args.phrases)
        ours_dedup = (time_ours(name, b, args.steps, umg=True, phrases=args.phrases,
                                overrides={"loss.text_dedup_frac": args.dedup})
                      if args.dedup else None)
        lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else None
        trim = {}
        if lengths:  # real text lengths, batch trimmed by the trainer (data.trim_text)
            trim["ours_clip_trim_f32"] = time_ours(name, b, args.steps, umg=False,
                                                   lengths=lengths)
            trim["ours_umg_trim_f32"] = time_ours(name, b, args.steps, umg=True,
                                                  phrases=args.phrases, lengths=lengths)
            if args.dedup:
                trim["ours_umg_trim_dedup_f32"] = time_ours(
                    name, b, args.steps, umg=True, phrases=args.phrases, lengths=lengths,
                    overrides={"loss.text_dedup_frac": args.dedup})
            base = trim["ours_clip_trim_f32"]["step_s"]
            trim["lengths"] = lengths
            trim["umg_trim_over_clip_trim_step"] = trim["ours_umg_trim_f32"]["step_s"] / base
            if args.dedup:
                trim["umg_trim_dedup_over_clip_trim_step"] = \
                    trim["ours_umg_trim_dedup_f32"]["step_s"] / base
            trim["umg_trim_speedup"] = ours_umg["step_s"] / trim["ours_umg_trim_f32"]["step_s"]
        oc32 = time_open_clip(name, b, args.steps, bf16=False)
        oc16 = time_open_clip(name, b, args.steps, bf16=True)
        row = {"model": name, "batch": b, "ours_clip_f32": ours_clip, "ours_clip_bf16": ours_bf16,
               "ours_umg_f32": ours_umg, "peak_flops_bf16": peak_bf16,
               "mfu_ours_clip_bf16": ours_bf16["flops"] / ours_bf16["step_s"] / peak_bf16,
               "open_clip_f32": oc32, "open_clip_bf16": oc16,
               "mfu_ours_clip": ours_clip["flops"] / ours_clip["step_s"] / args.peak,
               "umg_over_clip_step": ours_umg["step_s"] / ours_clip["step_s"],
               "ours_umg_dedup_f32": ours_dedup, "phrases": args.phrases,
               "umg_dedup_over_clip_step": (ours_dedup["step_s"] / ours_clip["step_s"]
                                            if ours_dedup else None), **trim}
        if oc32 and "step_s" in oc32:
            row["speedup_vs_open_clip_f32"] = oc32["step_s"] / ours_clip["step_s"]
        if oc16 and "step_s" in oc16:
            row["speedup_vs_open_clip_bf16"] = oc16["step_s"] / ours_bf16["step_s"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
    head = (f"{'model':<6}{'batch':>6}{'ours img/s':>12}{'MFU':>7}{'open_clip f32':>15}"
            f"{'x':>7}{'ours bf16':>11}{'MFU':>7}{'open_clip bf16':>16}{'x':>7}"
            f"{'UMG/CLIP step':>15}{'+dedup':>8}"
            f"{'trimmed':>9}{'+dedup':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        oc32 = r["open_clip_f32"].get("img_s", float("nan"))
        oc16 = r["open_clip_bf16"].get("img_s", float("nan"))
        print(f"{r['model']:<6}{r['batch']:>6}{r['ours_clip_f32']['img_s']:>12.2f}"
              f"{100 * r['mfu_ours_clip']:>6.0f}%{oc32:>15.2f}"
              f"{r.get('speedup_vs_open_clip_f32', float('nan')):>7.2f}"
              f"{r['ours_clip_bf16']['img_s']:>11.2f}{100 * r['mfu_ours_clip_bf16']:>6.0f}%"
              f"{oc16:>16.2f}"
              f"{r.get('speedup_vs_open_clip_bf16', float('nan')):>7.2f}"
              f"{r['umg_over_clip_step']:>15.2f}"
              f"{r['umg_dedup_over_clip_step'] or float('nan'):>8.2f}"
              f"{r.get('umg_trim_over_clip_trim_step', float('nan')):>9.2f}"
              f"{r.get('umg_trim_dedup_over_clip_trim_step', float('nan')):>8.2f}")
    print("wrote", write_result(args.out, {"peak_flops": args.peak,
                                           "load_avg_before": load_before, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
