"""Every shipped config's train step compiled for a GPU node by the real XLA:GPU compiler (no GPU
needed), and what cuDNN attention with odd lengths padded to even buys over XLA's attention.

    python benchmarks/gpu_compile.py                                  # h100:1x1x8, all configs
    python benchmarks/gpu_compile.py --configs vit_l,tiny --per_gpu 32 --topology h200:1x1x8

Part 1: each ``configs/*.py`` at ``--per_gpu`` examples per GPU (``model.dtype`` as shipped;
float32 configs take XLA attention by rule) goes through ``umg_jax.dryrun.analyse``: compile
seconds, HBM per GPU, the fused-attention calls in the compiled HLO, the roofline. SigLIP
configs need a SentencePiece file; a tiny one is trained in a temp dir for the compile (the
tokenizer does not change the step's shapes).

Part 2: ``--compare`` (default ``vit_l``) at ``--compare_per_gpu`` (256) with ``model.attention``
``"auto"`` (cuDNN, 257 -> 258 and 77 -> 78 tokens padded) and ``"xla"``: HBM per GPU and the
compiled HBM bytes and FLOPs per step (``umg_jax.hlo_stats``, cuDNN / cuBLAS calls counted).

Writes ``benchmarks/results/gpu_compile.json`` (``--out``) with its provenance and prints a table.
The figures are the compiler's: nothing runs on a GPU.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys
import tempfile
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
GiB = 1024 ** 3


def _tiny_spm(directory: str) -> str:
    """A SentencePiece model trained on a few sentences (stands in for SigLIP's)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    texts = ["a photo of a cat", "a red car on the road", "two dogs play in the grass",
             "the sky over the sea", "big green trees and small houses near blue water"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf,
                                   vocab_size=30, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", minloglevel=3)
    path = pathlib.Path(directory) / "spm.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def _row(name: str, config, chip, devices) -> dict:
    from umg_jax import dryrun

    t0 = time.perf_counter()
    try:
        r = dryrun.analyse(config, chip=chip, devices=devices, compiler="gpu")
    except Exception as e:  # noqa: BLE001 - a config that does not compile is the finding
        return {"config": name, "batch_size": int(config.batch_size), "compiles": False,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                "seconds": time.perf_counter() - t0}
    return {"config": name, "batch_size": r["batch_size"], "compiles": True,
            "dtype": r["dtype"], "attention": config.model.get("attention", "auto"),
            "compile_s": r["compile_s"], "gib_per_gpu": r["bytes_per_device"]["total"] / GiB,
            "fits": r["fits"], "fused_attention": r.get("fused_attention", {}),
            "compiled_tflops_per_gpu": r["compiled"]["flops"] / 1e12,
            "compiled_tb_per_gpu": r["compiled"]["bytes_accessed"] / 1e12,
            "roofline_step_s": r["roofline"]["step_s"], "bound": r["roofline"]["bound"],
            "est_images_per_s": r["est_images_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", default="h100:1x1x8", help="GPU node, CARD:SxHxG")
    ap.add_argument("--configs", default="all", help="comma-separated configs/<name>.py, or all")
    ap.add_argument("--per_gpu", type=int, default=64, help="examples per GPU in part 1")
    ap.add_argument("--compare", default="vit_l", help="config of part 2 ('' = skip)")
    ap.add_argument("--compare_per_gpu", type=int, default=256, help="examples per GPU, part 2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_compile.json"))
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")  # the compile is deviceless; never open a GPU
    from umg_jax import accelerators, config_lib, configs

    try:
        devices = accelerators.topology_devices(args.topology)
    except (accelerators.TopologyError, accelerators.CompilerUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chip = accelerators.jax_usable(accelerators.topology_chip(args.topology))
    names = (configs.names()
             if args.configs == "all" else [c.strip() for c in args.configs.split(",")])
    rows, compare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        spm = None
        for name in names:
            config = config_lib.load_config(str(ROOT / "configs" / f"{name}.py"))
            config.batch_size = args.per_gpu * len(devices)
            if config.model.text.get("tokenizer", "clip") == "":  # SigLIP ships none
                spm = spm or _tiny_spm(tmp)
                config.model.text.tokenizer = spm
            print(f"compiling {name} at {config.batch_size} for {args.topology} ...",
                  file=sys.stderr, flush=True)
            rows.append(_row(name, config, chip, devices))
        if args.compare:
            for attention in ("auto", "xla"):
                config = config_lib.load_config(str(ROOT / "configs" / f"{args.compare}.py"))
                config.batch_size = args.compare_per_gpu * len(devices)
                config.model.attention = attention
                print(f"compiling {args.compare} with attention={attention} ...",
                      file=sys.stderr, flush=True)
                compare.append(_row(args.compare, config, chip, devices))

    print(f"{'config':<14} {'batch':>6} {'dtype':>9} {'GiB/GPU':>8} {'cuDNN fmha':>11} "
          f"{'compile s':>9}")
    for r in rows:
        if not r["compiles"]:
            print(f"{r['config']:<14} {r['batch_size']:>6} DOES NOT COMPILE: {r['error']}")
            continue
        fmha = sum(v for k, v in r["fused_attention"].items() if "cudnn" in k)
        print(f"{r['config']:<14} {r['batch_size']:>6} {r['dtype']:>9} {r['gib_per_gpu']:>8.2f} "
              f"{fmha:>11.0f} {r['compile_s']:>9.0f}")
    for r in compare:
        if r["compiles"]:
            print(f"{args.compare} attention={r['attention']}: {r['gib_per_gpu']:.2f} GiB/GPU, "
                  f"{r['compiled_tb_per_gpu']:.2f} TB and {r['compiled_tflops_per_gpu']:.1f} "
                  f"TFLOP per GPU per step, roofline {r['roofline_step_s']:.3f} s")
    write_result(args.out, {"topology": args.topology, "chip": chip.name,
                            "hbm_gib_usable": chip.hbm_gib, "per_gpu": args.per_gpu,
                            "configs": rows, "attention_compare": compare,
                            "note": "compiled deviceless by XLA:GPU; nothing ran on a GPU"})
    print(f"wrote {args.out}")
    return 0 if all(r["compiles"] for r in rows + compare) else 1


if __name__ == "__main__":
    sys.exit(main())
