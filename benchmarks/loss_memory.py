"""Per-device memory of the contrastive loss (+ its gradient) on 8 fake CPU devices: the naive
full-logits loss vs our chunked ``shard_map`` core, from the compiled executables'
``memory_analysis()`` (nothing big is executed).

    python benchmarks/loss_memory.py [--batches 1024,4096,16384,65536] [--chunk 1024]

(a) naive: a plain ``jit`` over the globally split arrays that forms the full ``[N, N]`` logits
    (XLA's SPMD partitioner gathers the texts and row-splits the logits: ``[N/8, N]`` per device).
(b) ours: ``umg_jax.losses.contrastive.contrastive_loss`` (texts all-gathered, chunked
    checkpointed scan; multi-positive keys and validity masks included); ``sigmoid_ring`` rows:
    ``exchange="ring"`` (texts passed around a ``ppermute`` ring, custom backward ring).

Terms: ``image`` (N = B anchors vs B captions) with softmax and sigmoid, and ``region`` (N = 4 B
boxes vs 4 B region texts; the mask term uses the same core). The pixel term is per image by
construction ([B, patches, M] logits, no cross-image matrix), so it has no naive/global variant;
its temp is reported for ours only. At the smallest batch both losses are also run once to check
they agree.

Step-time ratio (``--step_batch``, default 256; 0 = skip): the tiny model's whole UMG train step
(images + captions + tags + regions + masks + pixels) over its image-only (CLIP) step, both timed
with ``benchmarks/train_step.py``'s ``time_ours`` on one device, (i) with every token column and
no text de-duplication, (ii) as the trainer runs it: texts of real lengths trimmed
(``data.trim_text``; ``--lengths`` caption,element tokens) and element texts drawn from
``--phrases`` distinct phrases de-duplicated (``loss.text_dedup_frac=--dedup``).
Writes benchmarks/results/loss_memory.json (``provenance.write_result``).
"""

from __future__ import annotations

import os

USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")  # the step timing runs without fake devices
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections as mlc  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from provenance import write_result  # noqa: E402

from umg_jax import sharding  # noqa: E402
from umg_jax.losses.contrastive import contrastive_loss  # noqa: E402
from umg_jax.losses.pixel import pixel_loss  # noqa: E402

E = 512  # embedding dim (ViT-B)
REGIONS = 4  # boxes per image for the region term
GRID, MASKS = 7, 8  # pixel term: 7x7 patches (B/32 at 224 px), masks per image
MIB = 2**20


def _naive(kind):
    def loss(a, t, log_scale):
        a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
        t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
        logits = jnp.exp(log_scale) * a @ t.T
        if kind == "softmax":
            diag = jnp.diagonal(logits)
            return 0.5 * (jnp.mean(jax.nn.logsumexp(logits, 1) - diag)
                          + jnp.mean(jax.nn.logsumexp(logits, 0) - diag))
        z = 2.0 * jnp.eye(logits.shape[0]) - 1.0
        return -jnp.sum(jax.nn.log_sigmoid(z * (logits - 10.0))) / logits.shape[0]
    return loss


def _ours(kind, mesh, chunk):
    kind, exchange = ("sigmoid", "ring") if kind == "sigmoid_ring" else (kind, "all_gather")

    def loss(a, t, log_scale):
        n = a.shape[0]
        # unique keys (row index): one positive per anchor, as in the naive loss
        keys = jnp.stack([jnp.arange(n, dtype=jnp.int32)] * 2, -1)
        valid = jnp.ones((n,), bool)
        return contrastive_loss(a, valid, keys[:, None], valid[:, None], t, valid, keys,
                                log_scale, jnp.float32(-10.0), kind=kind, chunk_size=chunk,
                                mesh=mesh, exchange=exchange)[0]
    return loss


def _compile(fn, n, mesh, run=False):
    row = NamedSharding(mesh, P(sharding.BATCH_AXES))
    rep = NamedSharding(mesh, P())
    g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)), in_shardings=(row, row, rep),
                out_shardings=(rep, (row, row)))
    spec = jax.ShapeDtypeStruct((n, E), jnp.float32, sharding=row)
    t0 = time.perf_counter()
    compiled = g.lower(spec, spec, jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)).compile()
    dt = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = {"temp_mib": mem.temp_size_in_bytes / MIB, "arg_mib": mem.argument_size_in_bytes / MIB,
           "compile_s": dt}
    if run:
        rng = np.random.default_rng(0)
        a = rng.normal(size=(n, E)).astype(np.float32)
        t = a + 1.5 * rng.normal(size=(n, E)).astype(np.float32)
        loss, grads = compiled(jax.device_put(a, row), jax.device_put(t, row),
                               jax.device_put(np.float32(np.log(1 / 0.07)), rep))
        out["loss"] = float(loss)
        out["grads"] = [np.asarray(x) for x in grads]
    return out


def _pixel_temp(b, mesh):
    row = NamedSharding(mesh, P(sharding.BATCH_AXES))
    rep = NamedSharding(mesh, P())

    def f(dense, txt, tokens, valid, target, log_scale):
        return pixel_loss(dense, txt, tokens, valid, target, log_scale, None, kind="softmax")[0]

    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)),
                in_shardings=(row, row, row, row, row, rep), out_shardings=(rep, (row, row)))
    s = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=row)
    compiled = g.lower(s((b, GRID, GRID, E)), s((b, MASKS, E)), s((b, MASKS, 77), jnp.int32),
                       s((b, MASKS), jnp.bool_), s((b, GRID, GRID), jnp.int32),
                       jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def step_ratio(batch: int, steps: int, phrases: int, dedup: float,
               lengths: tuple[int, int]) -> list[dict]:
    """UMG step / CLIP step of the tiny model, every column vs trimmed + de-duplicated.

    Timed in a child process with the user's XLA flags: the 8 fake devices of the memory part
    share the cores and slow the step (one run: 12.7 s instead of 3.8 s for the untrimmed UMG
    step)."""
    import subprocess

    here = pathlib.Path(__file__).parent
    out = []
    for label, lens, dd in (("every column, no de-dup", None, 0.0),
                            ("trimmed + de-dup", lengths, dedup)):
        code = ("import json\n"  # run in benchmarks/ (cwd): train_step imports by name
                "from train_step import time_ours\n"
                f"c = time_ours('tiny', {batch}, {steps}, umg=False, lengths={lens!r})\n"
                f"u = time_ours('tiny', {batch}, {steps}, umg=True, phrases={phrases}, "
                f"lengths={lens!r}, overrides={{'loss.text_dedup_frac': {dd}}})\n"
                "print(json.dumps([c['step_s'], u['step_s']]))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=here, env={**os.environ, "XLA_FLAGS": USER_XLA_FLAGS}, check=True)
        clip_s, umg_s = json.loads(res.stdout.strip().splitlines()[-1])
        out.append({"variant": label, "batch": batch, "lengths": lens, "text_dedup_frac": dd,
                    "phrases": phrases, "clip_step_s": clip_s, "umg_step_s": umg_s,
                    "ratio": umg_s / clip_s})
        print(f"tiny B={batch} {label:24s} CLIP step {clip_s:.3f}s  UMG step {umg_s:.3f}s  "
              f"ratio {out[-1]['ratio']:.2f}x", flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1024,4096,16384,65536")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                             / "loss_memory.json"))
    parser.add_argument("--step_batch", type=int, default=256,
                        help="batch of the UMG / image-only step-time ratio (0 = skip)")
    parser.add_argument("--step_steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--phrases", type=int, default=200,
                        help="distinct tag / region / mask phrases in the step batches")
    parser.add_argument("--dedup", type=float, default=0.05,
                        help="loss.text_dedup_frac of the trimmed step")
    parser.add_argument("--lengths", default="20,8", help="caption,element text tokens")
    args = parser.parse_args()
    mesh = sharding.make_mesh(mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    batches = [int(x) for x in args.batches.split(",")]
    rows, check = [], {}
    for term, kind, mult in (("image", "softmax", 1), ("image", "sigmoid", 1),
                             ("image", "sigmoid_ring", 1), ("region", "softmax", REGIONS),
                             ("region", "sigmoid_ring", REGIONS)):
        for b in batches:
            n = b * mult
            run = b == batches[0] and term == "image" and n <= 4096  # never execute big ones
            naive = _compile(_naive(kind.replace("_ring", "")), n, mesh, run=run)
            ours = _compile(_ours(kind, mesh, args.chunk), n, mesh, run=run)
            if run:
                diff = max(float(np.abs(x - y).max())
                           for x, y in zip(naive.pop("grads"), ours.pop("grads"), strict=True))
                check[f"{term}/{kind}/B={b}"] = {"naive_loss": naive.pop("loss"),
                                                 "ours_loss": ours.pop("loss"),
                                                 "max_grad_diff": diff}
            rows.append({"term": term, "kind": kind, "global_batch": b, "rows": n,
                         "naive_temp_mib": naive["temp_mib"], "ours_temp_mib": ours["temp_mib"],
                         "ratio": naive["temp_mib"] / max(ours["temp_mib"], 1e-9),
                         "arg_mib": ours["arg_mib"],
                         "compile_s": naive["compile_s"] + ours["compile_s"]})
            print(f"{term:6s} {kind:7s} B={b:6d} N={n:6d}  naive {naive['temp_mib']:10.1f} MiB"
                  f"  ours {ours['temp_mib']:8.1f} MiB  ratio {rows[-1]['ratio']:7.1f}x",
                  flush=True)
    pixel = {}
    for b in batches:
        pixel[b] = _pixel_temp(b, mesh)
        print(f"pixel  softmax B={b:6d} ours {pixel[b]:8.1f} MiB (per-image logits only)",
              flush=True)
    for k, v in check.items():
        print(f"check {k}: naive loss {v['naive_loss']:.8f} ours {v['ours_loss']:.8f} "
              f"max |grad diff| {v['max_grad_diff']:.2e}")
    result = {"devices": jax.device_count(), "embed_dim": E, "chunk_size": args.chunk,
              "regions_per_image": REGIONS, "per_device_temp": rows,
              "pixel_temp_mib": {str(k): v for k, v in pixel.items()}, "agreement": check,
              "step_ratio": step_ratio(args.step_batch, args.step_steps, args.phrases,
                                       args.dedup, tuple(int(x) for x in
                                                         args.lengths.split(",")))
              if args.step_batch else []}
    print("wrote", write_result(args.out, result))


if __name__ == "__main__":
    main()
