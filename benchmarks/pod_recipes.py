"""Pod recipes from the TPU compiler: for each config and TPU slice, the largest global batch that
fits, its per-device HBM, the roofline img/s and the compiler's FLOP ratio of the UMG step to
the CLIP-only step at that batch; beside it, the CPU stand-in's figure for the same config.
With ``--gpu``, the same for GPU nodes (1 and 2 hosts of 8 H100 / H200) from XLA:GPU, with the
cuDNN fused-attention calls each step makes (no CLIP baseline: the ratio is the TPU table's).

    python benchmarks/pod_recipes.py                         # every cell (hours on 2 cores)
    python benchmarks/pod_recipes.py --configs vit_l --topologies v5e:16x16
    python benchmarks/pod_recipes.py --table_only             # rebuild the table from the JSONs
    python benchmarks/pod_recipes.py --gpu                    # GPU nodes (minutes per cell)

Each cell is one ``python -m umg_jax.dryrun --max_batch`` run in its own process (its JSON and log
in ``benchmarks/results/dryrun/``; a cell whose JSON exists is not recompiled, so an interrupted
run resumes). The first cell of a config also compiles the CLIP-only step (``--clip_baseline``):
the UMG / CLIP FLOP ratio depends on the per-chip mix of work, not on the slice. Later cells start
their search where the per-chip memory line of the previous cell meets their HBM; the first cell
of a config starts from the line of its single compiles (``<cell>_batch<N>.json``) when there are
two. Head-only configs (``seg_vit_l``) get no CLIP baseline. ViT-L/14 compiles in 4-5 minutes
per probe on 2 idle cores (``seg_vit_l`` 10-12) and a cell takes 2-8 probes; XLA:GPU compiles a
ViT-L probe in under a minute. Writes ``benchmarks/results/pod_recipes.json`` (``--gpu``:
``gpu_recipes.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from provenance import write_result

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks/results/dryrun"
CONFIGS = ("vit_l", "vit_l336", "seg_vit_l")
# Configs that train a head on a frozen backbone: the UMG / CLIP ratio (which step costs more)
# is a question about the contrastive step, so no CLIP-only baseline is compiled for them.
HEAD_ONLY = ("seg_vit_l",)
# One slice of 128-512 chips per TPU generation (memory per device depends on the per-device
# batch, not the slice size, so the largest batch scales with the chip count).
TOPOLOGIES = ("v4:4x4x8", "v5e:16x16", "v5p:4x8x8", "v6e:16x16")
# One and two 8-GPU hosts (HGX / DGX nodes) of each card (``--gpu``).
GPU_TOPOLOGIES = ("h100:1x1x8", "h100:1x2x8", "h200:1x1x8", "h200:1x2x8")
# First probe per GPU of a config's first GPU cell (no memory line yet): the configs' TPU-sized
# batches (32,768 = 4,096 per GPU) take XLA:GPU minutes to compile and are far past 80 GiB;
# ViT-L/14 at 256 per GPU needs ~25 GiB (2026-12-07).
GPU_FIRST_PROBE = 256
GiB = 1024 ** 3


def cell_path(config: str, topology: str) -> pathlib.Path:
    return OUT_DIR / f"{config}_{topology.replace(':', '_')}.json"


def standin_path(config: str, devices: int, target: str) -> pathlib.Path:
    return OUT_DIR / f"{config}_cpu{devices}_{target}.json"


def run(args: list[str], out: pathlib.Path, log) -> bool:
    """Runs the dry run (unless ``out`` exists), its output in ``out`` + ``.log``; True if
    ``out`` holds a result."""
    if out.exists():
        log(f"{out.name}: exists, kept")
        return True
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "umg_jax.dryrun", *args, "--json", str(out)]
    log(" ".join(cmd[1:]))
    log_path = out.with_suffix(".log")
    with open(log_path, "w") as f:  # a file, not a pipe: the child outlives a killed parent
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    log(f"  exit {code} after {time.time() - t0:.0f} s ({log_path})")
    if code not in (0, 1) or not out.exists():
        log(log_path.read_text()[-3000:])
        return False
    return True


def _fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares ``(intercept, slope)`` of ``(x, y)`` points; None without two distinct x."""
    if len(points) < 2:
        return None
    x, y = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    var = sum((a - mx) ** 2 for a in x)
    if var == 0:
        return None
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / var
    return my - slope * mx, slope


def per_chip_line(path: pathlib.Path) -> tuple[float, float] | None:
    """``(fixed bytes, bytes per example)`` per chip, fitted (least squares) to a cell's probes
    against the per-chip batch; None with fewer than two probes."""
    d = json.loads(path.read_text())
    probes = d["rows"][0].get("max_batch_probes", [])
    # Probes the compiler refused carry only a lower bound on their memory: not on the line.
    return _fit([(p["batch_size"] / d["devices"], p["total"]) for p in probes
                 if not p.get("compile_error")])


def singles_line(config: str, compiler: str = "tpu") -> tuple[float, float] | None:
    """The per-chip memory line of ``config``'s single compiles (``<config>_<slice>_batch<N>
    .json``) by ``compiler`` (``"tpu"`` or ``"gpu"``), to seed its first search; None without
    two batches."""
    points = []
    for q in sorted(OUT_DIR.glob(f"{config}_*_batch*.json")):
        d = json.loads(q.read_text())
        if d.get("compiler", "tpu") != compiler:
            continue
        r = d["rows"][0]
        points.append((r["batch_size"] / d["devices"], r["bytes_per_device"]["total"]))
    return _fit(points)


def batch_hint(line: tuple[float, float], hbm_gib: float, chips: int) -> int | None:
    """First probe for a new slice: the per-chip batch where ``line`` meets 97 % of the HBM."""
    fixed, slope = line
    if slope <= 0:
        return None
    per_chip = int((0.97 * hbm_gib * GiB - fixed) / slope)
    return per_chip * chips if per_chip >= 1 else None


def table(configs, topologies, standins) -> tuple[str, list[dict]]:
    rows = []
    for cfg in configs:
        for topo in topologies:
            path, searched = cell_path(cfg, topo), True
            if not path.exists():
                # No search yet: the largest single compile that fits is a lower bound.
                singles = [(json.loads(q.read_text()), q) for q in
                           OUT_DIR.glob(f"{path.stem}_batch*.json")]
                singles = [(d, q) for d, q in singles if d["rows"][0]["fits"]]
                if not singles:
                    continue
                path = max(singles, key=lambda dq: dq[0]["rows"][0]["batch_size"])[1]
                searched = False
            d = json.loads(path.read_text())
            r = d["rows"][0]
            rows.append({
                "config": cfg, "topology": topo, "chips": d["devices"], "chip": d["chip"],
                "compiler": d["compiler"], "searched": searched,
                "max_batch": r["batch_size"] if r["fits"] else 0,
                "per_device_batch": r["per_device_batch"],
                "hbm_gib": r["bytes_per_device"]["total"] / GiB,
                "chip_hbm_gib": r["hbm_bytes"] / GiB, "img_s": r["est_images_per_s"],
                "bound": r["roofline"]["bound"], "mfu": r["est_mfu"],
                "umg_over_clip": r.get("umg_over_clip_flops"),
                "fused_attention_calls": r.get("fused_attention_calls", 0),
                "fused_attention": r.get("fused_attention", {}),
                "probes": r.get("max_batch_probes", []), "date": d.get("date")})
    ratio_of = {}
    for r in rows:
        if r["umg_over_clip"]:
            ratio_of.setdefault(r["config"], (r["umg_over_clip"], r["topology"]))
    for r in rows:
        if not r["umg_over_clip"] and r["config"] in ratio_of:
            r["umg_over_clip"], r["umg_over_clip_from"] = ratio_of[r["config"]]
    if rows and all(r["compiler"] == "gpu" for r in rows):
        return gpu_table(rows), rows
    lines = ["| config | slice | largest global batch (per chip) | HBM / chip at it | "
             "roofline img/s (bound, MFU) | UMG / CLIP FLOPs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['umg_over_clip']:.2f}x" if r["umg_over_clip"]
                 else "n/a (head only)" if r["config"] in HEAD_ONLY else "-")
        if r.get("umg_over_clip_from"):
            ratio += f" (on {r['umg_over_clip_from']})"
        batch = (f"{r['max_batch']:,} ({r['per_device_batch']:g})" if r["max_batch"]
                 else "none fits")
        if not r["searched"]:
            batch = f">= {batch} (fits; largest not searched)"
        lines.append(f"| {r['config']} | {r['topology']} ({r['chips']} chips) | {batch} | "
                     f"{r['hbm_gib']:.1f} of {r['chip_hbm_gib']:g} GiB | {r['img_s']:,.0f} "
                     f"({r['bound']}, {100 * r['mfu']:.0f} %) | {ratio} |")
    cmp_lines = []
    for cfg, devices, target, topo in standins:
        s_path, t_path = standin_path(cfg, devices, target), cell_path(cfg, topo)
        if not (s_path.exists() and t_path.exists()):
            continue
        s = json.loads(s_path.read_text())["rows"][0]
        t = json.loads(t_path.read_text())["rows"][0]
        totals = [p["total"] for p in t.get("max_batch_probes", [])
                  if p["batch_size"] == s["batch_size"]]
        # A single compile at the stand-in's batch (``dryrun --json <cell>_batch<N>.json``)
        # serves when the search never probed that batch.
        one = t_path.with_name(f"{t_path.stem}_batch{s['batch_size']}.json")
        if not totals and one.exists():
            totals = [json.loads(one.read_text())["rows"][0]["bytes_per_device"]["total"]]
        if not totals:
            continue
        cmp_lines.append(f"| {cfg} | {s['batch_size']:,} | {topo} | "
                         f"{s['bytes_per_device']['total'] / GiB:.1f} GiB | "
                         f"{totals[0] / GiB:.1f} GiB |")
    if cmp_lines:
        lines += ["", "| config | global batch | slice | CPU stand-in / device | TPU compiler / "
                  "device |", "|---|---|---|---|---|", *cmp_lines]
    return "\n".join(lines), rows


def _batch_cell(r: dict) -> str:
    batch = (f"{r['max_batch']:,} ({r['per_device_batch']:g})" if r["max_batch"]
             else "none fits")
    return batch if r["searched"] else f">= {batch} (fits; largest not searched)"


def gpu_table(rows: list[dict]) -> str:
    """The GPU nodes' markdown table: per config and node, the largest batch, HBM per GPU,
    roofline img/s and the cuDNN fused-attention calls per step (forward / backward)."""
    lines = ["| config | node | largest global batch (per GPU) | HBM / GPU at it (of JAX's "
             "share) | roofline img/s (bound, MFU) | cuDNN attention calls / step (fwd / bwd) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        calls = r["fused_attention"]
        fwd = sum(n for t, n in calls.items() if t.startswith("__cudnn$fmha")
                  and "Backward" not in t)
        bwd = sum(n for t, n in calls.items() if t.startswith("__cudnn$fmha") and "Backward" in t)
        hosts = r["topology"].split(":")[1].split("x")
        node = f"{r['topology']} ({int(hosts[1])} x {int(hosts[2])} GPUs)"
        lines.append(f"| {r['config']} | {node} | {_batch_cell(r)} | "
                     f"{r['hbm_gib']:.1f} of {r['chip_hbm_gib']:g} GiB | {r['img_s']:,.0f} "
                     f"({r['bound']}, {100 * r['mfu']:.0f} %) | "
                     f"{f'{fwd} / {bwd}' if fwd or bwd else 'none (XLA attention)'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated config names")
    ap.add_argument("--topologies", default=None, help="comma-separated slices / nodes "
                    f"(default {','.join(TOPOLOGIES)}; with --gpu {','.join(GPU_TOPOLOGIES)})")
    ap.add_argument("--gpu", action="store_true", help="GPU nodes (XLA:GPU, the CUDA plugin): "
                    "no CLIP baseline unless --clip_all, no stand-in rows, gpu_recipes.json")
    ap.add_argument("--standin", default=None,
                    help="CPU stand-in comparisons, CONFIG:DEVICES:TARGET:TOPOLOGY;... "
                    "('' = none; default vit_l:256:tpu_v5e:v5e:16x16, none with --gpu)")
    ap.add_argument("--table_only", action="store_true", help="only rebuild the table")
    ap.add_argument("--clip_all", action="store_true", help="compile the CLIP-only baseline "
                    "in every cell (default: the first cell of each config)")
    ap.add_argument("--hlo_dir", default=None, help="keep every probe's compiled HLO text here "
                    "(DIR/<config>_<slice>/...), to re-read costs without recompiling")
    ap.add_argument("--out", default=None, help="default benchmarks/results/pod_recipes.json "
                    "(--gpu: gpu_recipes.json)")
    args = ap.parse_args(argv)
    if args.topologies is None:
        args.topologies = ",".join(GPU_TOPOLOGIES if args.gpu else TOPOLOGIES)
    if args.standin is None:
        args.standin = "" if args.gpu else "vit_l:256:tpu_v5e:v5e:16x16"
    if args.out is None:
        args.out = str(ROOT / "benchmarks/results" / ("gpu_recipes.json" if args.gpu
                                                       else "pod_recipes.json"))
    configs = [c for c in args.configs.split(",") if c]
    topologies = [t for t in args.topologies.split(",") if t]
    for c in configs:
        if not (ROOT / f"configs/{c}.py").exists():
            ap.error(f"no configs/{c}.py")
    standins = []
    for spec in filter(None, args.standin.split(";")):
        parts = spec.split(":")
        if len(parts) != 5 or not parts[1].isdigit():
            ap.error(f"--standin {spec!r}: expected CONFIG:DEVICES:TARGET:GEN:SHAPE")
        standins.append((parts[0], int(parts[1]), parts[2], f"{parts[3]}:{parts[4]}"))

    def log(s):
        print(s, file=sys.stderr, flush=True)

    if not args.table_only:
        from umg_jax import accelerators

        for cfg in configs:
            # No cell searched yet: the config's single compiles, if any, seed the first one.
            line = singles_line(cfg, "gpu" if args.gpu else "tpu")
            clip_done = cfg in HEAD_ONLY or args.gpu
            for topo in topologies:
                path = cell_path(cfg, topo)
                extra = ([f"--hlo_dir={args.hlo_dir}/{path.stem}"] if args.hlo_dir else [])
                # The UMG / CLIP FLOP ratio depends on the per-chip mix of work, not the slice:
                # the CLIP-only step is compiled once per config unless --clip_all.
                if args.clip_all or not clip_done:
                    extra.append("--clip_baseline")
                if not path.exists():
                    # (a GPU's HBM as the dry run judges it: JAX's share)
                    chip = accelerators.jax_usable(accelerators.topology_chip(topo))
                    n = accelerators.topology_size(topo)
                    hint = batch_hint(line, chip.hbm_gib, n) if line else None
                    if hint is None and chip.platform == "gpu":
                        hint = GPU_FIRST_PROBE * n
                    if hint:
                        extra.append(f"--config.batch_size={hint}")
                if run(["--config", f"configs/{cfg}.py", "--topology", topo, "--max_batch",
                        *extra], path, log):
                    line = per_chip_line(path) or line
                    clip_done = clip_done or bool(
                        json.loads(path.read_text())["rows"][0].get("umg_over_clip_flops"))
        for cfg, devices, target, _ in standins:
            run(["--config", f"configs/{cfg}.py", "--devices", str(devices), "--target", target],
                standin_path(cfg, devices, target), log)
    md, rows = table(configs, topologies, standins)
    print(md)
    write_result(args.out, {"rows": rows, "table": md})
    return 0


if __name__ == "__main__":
    sys.exit(main())
