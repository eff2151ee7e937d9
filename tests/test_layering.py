"""The package's layers, and the import direction between them.

``LAYERS`` lists every top-level unit of ``umg_jax`` (a module or a subpackage) from the bottom
up. A unit may import units of its own layer or of a layer below, never above; units import each
other without cycles; no module imports another module's private (``_name``) members; and the
compute layers take from ``data`` only its pure parts (the contract, the tokenizer, the
transforms), so that training code never reads or generates a data set. The README's Layout
section is this table, rendered by ``python tests/test_layering.py``.
"""

from __future__ import annotations

import ast
import collections
import pathlib
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "umg_jax"

# (layer, {unit: what it holds}), bottom first.
LAYERS: list[tuple[str, dict[str, str]]] = [
    ("foundation", {
        "storage": "where files live: local paths, gs://, s3:// (checks, whole-file writes, "
                   "append-only logs, tree copies)",
        "concurrency": "host thread pools (decode ahead of the device)",
        "configs": "shipped experiment configs + common.py (every knob, commented)",
        "config_lib": "loading config files, the knob table of --show_config",
        "accelerators": "chip table, TPU topologies, GPU nodes (accelerators.toml, gpu_targets/)",
        "hlo_stats": "loop-aware costs of compiled HLO (dots, Pallas, cuBLAS / cuDNN calls)",
        "deprecated": "old python -m names forwarding to new ones for one release",
        "provenance": "how a recorded result was made: command, commit, date, load, machine",
        "host_platforms": "the JAX platforms this host has, pinned before a command starts JAX",
    }),
    ("device", {
        "sharding": "mesh, batch placement, regex param rules, activation constraints",
        "ops": "roi_align, mask_pool, dense + attention maths (custom VJPs, Pallas, cuDNN), "
               "the compile target's platform",
        "metrics": "metric writers, progress + ETA, MFU",
    }),
    ("data", {
        "data": "schema.py (THE record / batch contract), records, tokenizer, transforms, "
                "pipeline (Grain), synthetic world, build + sources/ (coco, vg, per-image)",
    }),
    ("models", {
        "models": "ViT, text tower, CLIP (two towers + temperatures), token merging, "
                  "mask decoder (the seg head), pos_embed resize, summary",
        "peft": "LoRA as a param-tree transform (adapters live in models/layers.py)",
    }),
    ("objectives", {
        "losses": "contrastive cores (softmax / sigmoid, chunked under shard_map), image, "
                  "region, pixel, UMG total, the seg head's loss",
        "evaluators": "numpy metric cores, zero-shot, retrieval, region, semantic, panoptic, "
                      "seg thresholds chosen on a validation split, "
                      "head / training-free / ensemble segmentation",
    }),
    ("state", {
        "optim": "optax chain, masks, schedules",
        "checkpoint": "orbax manager, finding params, data-iterator state",
    }),
    ("step", {
        "step": "the jitted train step (train.py and dryrun.py share it)",
        "config_checks": "a config's consistency, checked before anything compiles",
    }),
    ("inference", {
        "inference": "umg_jax.load / load_segmenter: trained models as plain Python objects",
    }),
    ("programs", {
        "evaluate": "held-out evaluation of a run (python -m umg_jax.evaluate)",
        "train": "the training loop (python -m umg_jax.train)",
        "dryrun": "compile the step for a TPU slice / GPU node without one (memory, FLOPs)",
        "demo": "the README picture",
        "plot": "metric curves of runs",
    }),
    ("applications", {
        "interop": "PyTorch / big_vision weights in, open_clip / HF out, the PyTorch-side model",
        "downstream": "the paper's benchmarks on their own files (python -m umg_jax.downstream)",
        "labeling": "pseudo-labelling: pseudo_label.py (a trained UMG-CLIP as teacher), "
                    "inputs_web.py (WebDataset tars, Parquet), annotate/ (teacher recipes; "
                    "run.py local and run_ray.py Ray Data engines; families/ hold the only "
                    "torch imports)",
    }),
    ("entry", {
        "__init__": "the public API (umg_jax.load, load_segmenter)",
        "benchmark": "deprecated name of downstream",
    }),
]

# The parts of ``data`` that compute code may import: pure functions, no data set I/O.
PURE_DATA = {"umg_jax.data.schema", "umg_jax.data.tokenizer", "umg_jax.data.transforms"}
COMPUTE_LAYERS = {"device", "models", "objectives", "state", "step"}
OTHER_DIRS = [
    ("configs/", "a link to umg_jax/configs (--config configs/tiny.py)"),
    ("tests/", "test_<module>.py; conftest.py sets 8 fake CPU devices"),
    ("benchmarks/", "scripts that print a table and write benchmarks/results/*.json "
                    "(provenance.py: command, commit, date, machine)"),
    ("tools/", "test.sh (.ci/run's command), tpu_pod.sh (TPU VM slice), slurm_gpu.sh "
               "(multi-node GPU), launcher_lib.sh"),
    ("docs/", "pictures used here"),
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1].removesuffix(".py")


def _imports(modules: dict[str, pathlib.Path]):
    """``(importer, imported module, line, imported names)`` for every ``umg_jax`` import,
    module-level or inside functions (a lazy import is still a dependency)."""
    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("umg_jax"):
                        yield name, resolve(a.name), node.lineno, ()
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("umg_jax"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    target = full if full in modules else resolve(node.module)
                    yield name, target, node.lineno, (() if full in modules else (a.name,))


def _layer_of() -> dict[str, int]:
    return {u: i for i, (_, units) in enumerate(LAYERS) for u in units}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    layer = _layer_of()
    assert not units - set(layer), f"place these in LAYERS: {sorted(units - set(layer))}"
    assert not set(layer) - units, f"gone from umg_jax: {sorted(set(layer) - units)}"


def test_no_upward_import():
    layer = _layer_of()
    names = [n for n, _ in LAYERS]
    bad = [f"{a}:{line} imports {b} ({names[layer[_unit(a)]]} -> {names[layer[_unit(b)]]})"
           for a, b, line, _ in _imports(_modules())
           if layer[_unit(b)] > layer[_unit(a)]]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph = collections.defaultdict(set)
    for a, b, _, _ in _imports(_modules()):
        if a != b and not b.startswith(a + "."):  # a package importing its own submodule
            graph[a].add(b)
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_names_across_modules():
    bad = [f"{a}:{line} imports {b}.{n}" for a, b, line, names in _imports(_modules())
           for n in names if n.startswith("_") and a != b]
    assert not bad, "private imports:\n" + "\n".join(bad)


def test_compute_code_imports_only_pure_data_modules():
    layer, names = _layer_of(), [n for n, _ in LAYERS]
    bad = [f"{a}:{line} imports {b}" for a, b, line, _ in _imports(_modules())
           if names[layer[_unit(a)]] in COMPUTE_LAYERS and _unit(b) == "data"
           and b not in PURE_DATA]
    assert not bad, "compute code reaching data-set I/O:\n" + "\n".join(bad)


def test_the_rule_catches_an_upward_edge(tmp_path, monkeypatch):
    """The checks are not vacuous: a models module importing train is reported."""
    fake = dict(_modules())
    f = tmp_path / "bad.py"
    f.write_text("from umg_jax import train\nfrom umg_jax.data.synthetic import _x\n")
    fake["umg_jax.models.bad"] = f
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: fake)
    for check in (test_no_upward_import, test_compute_code_imports_only_pure_data_modules,
                  test_no_private_names_across_modules):
        try:
            check()
        except AssertionError as e:
            assert "umg_jax.models.bad:" in str(e)
        else:
            raise AssertionError(f"{check.__name__} missed the bad edge")


def render_layout() -> str:
    """The README's Layout block: layers top first, as a reader meets them."""
    lines = ["```", "umg_jax/   (each layer imports only the layers below it; "
             "tests/test_layering.py)"]
    for name, units in reversed(LAYERS):
        lines.append(f"  [{name}]")
        for unit, text in units.items():
            label = unit if (PKG / unit).is_dir() or unit == "__init__" else f"{unit}.py"
            if (PKG / unit).is_dir():
                label += "/"
            lines += textwrap.wrap(text, 100, initial_indent=f"    {label:<18}",
                                   subsequent_indent=" " * 22)
    for d, text in OTHER_DIRS:
        lines += textwrap.wrap(text, 100, initial_indent=f"{d:<22}", subsequent_indent=" " * 22)
    lines.append("```")
    return "\n".join(lines)


def test_readme_layout_is_the_table():
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- layout: begin -->\n", "\n<!-- layout: end -->"
    assert begin in readme and end in readme, "README.md lacks the layout markers"
    got = readme.split(begin, 1)[1].split(end, 1)[0]
    assert got == render_layout(), "README Layout is stale: python tests/test_layering.py"


if __name__ == "__main__":
    print(render_layout())
