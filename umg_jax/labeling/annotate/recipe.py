"""The recipe: which backend runs each stage, with which model directory and policy.

``recipe.json``::

    {"vocab": "tags.txt",                 # a file (one tag per line) or a list of names
     "stuff_names": null,                 # optional file; default: the shipped stuff_names.txt
     "stages": [
       {"stage": "caption", "backend": "blip2", "model": "blip2-dir", "when": "missing"},
       {"stage": "tag", "backend": "clip", "model": "clip-dir", "threshold": 0.3},
       {"stage": "detect", "backend": "owlv2", "model": "owlv2-dir", "threshold": 0.1},
       {"stage": "region_caption", "backend": "florence2", "model": "florence2-dir"},
       {"stage": "segment", "backend": "sam", "model": "sam-dir"},
       {"stage": "filter", "min_box_area": 0.001}]}

Relative paths are relative to the recipe file. Each entry: ``stage``, ``backend`` (a name of
``backend.BACKENDS``, or ``"package.module:Class"`` for your own :class:`backend.Backend`
subclass), ``model`` (local directory, never downloaded), ``options`` (passed to the backend),
and the stage's policy keys (``<stage>.POLICY`` holds them with their defaults). Stages run in
the order caption, tag, detect, region_caption, segment, filter; a stage may appear more than
once (e.g. two taggers, or SAM for boxes then SAM 3 for stuff). Unknown keys are errors.

Optional scheduling keys of an entry (:data:`RESOURCE_KEYS`; none changes what is produced):
``batch_size`` (at most this many images per model call, in both engines: the engine's batch is
cut into such chunks) and, for ``--engine ray``, ``num_gpus`` (GPUs per actor of this stage,
fractions let small teachers share a GPU; the filter takes none), ``num_cpus`` (per actor or
task; default: the cluster's CPUs shared evenly) and ``concurrency`` (actors: ``N`` or
``[min, max]`` for an autoscaling pool; default 1).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
from typing import Any

from umg_jax.labeling.annotate import caption, detect, region_caption, segment, tag
from umg_jax.labeling.annotate import filter as filter_stage
from umg_jax.labeling.annotate.backend import STAGES, AnnotateError, Backend, backend_class
from umg_jax.labeling.annotate.stage import Context
from umg_jax.labeling.annotate.things import load_stuff_names

STAGE_MODULES = {"caption": caption, "tag": tag, "detect": detect,
                 "region_caption": region_caption, "segment": segment, "filter": filter_stage}
_ENTRY_KEYS = {"stage", "backend", "model", "options"}
RESOURCE_KEYS = ("batch_size", "num_gpus", "num_cpus", "concurrency")


def _check_resources(e: dict[str, Any], where: str) -> dict[str, Any]:
    """The entry's scheduling keys, checked (:data:`RESOURCE_KEYS`)."""
    r = {k: e[k] for k in RESOURCE_KEYS if k in e}

    def num(x) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    if "batch_size" in r and not count(r["batch_size"]):
        raise AnnotateError(f"{where}: \"batch_size\" must be an integer >= 1")
    if "num_gpus" in r and not (num(r["num_gpus"]) and r["num_gpus"] >= 0):
        raise AnnotateError(f"{where}: \"num_gpus\" must be a number >= 0 (fractions share "
                            "a GPU)")
    if "num_cpus" in r and not (num(r["num_cpus"]) and r["num_cpus"] > 0):
        raise AnnotateError(f"{where}: \"num_cpus\" must be a number > 0")
    c = r.get("concurrency")
    if c is not None and not (count(c) or (isinstance(c, list) and len(c) == 2 and
                                           all(map(count, c)) and c[0] <= c[1])):
        raise AnnotateError(f"{where}: \"concurrency\" must be an integer >= 1 or "
                            "[min, max] with 1 <= min <= max")
    if e.get("stage") == "filter" and r.get("num_gpus"):
        raise AnnotateError(f"{where}: the filter runs on CPUs; \"num_gpus\" is for model "
                            "stages")
    return r


@dataclasses.dataclass
class Step:
    """One recipe entry, resolved: ``name`` is what the state credits (``by``)."""

    stage: str
    name: str
    model: str | None
    policy: dict[str, Any]
    options: dict[str, Any]
    backend: Backend | None = None
    resources: dict[str, Any] = dataclasses.field(default_factory=dict)  # RESOURCE_KEYS

    def run(self, images, states, ctx: Context) -> None:
        """Runs the stage over aligned ``images`` / ``states`` (in chunks of the entry's
        ``batch_size``, when it gives one)."""
        n = self.resources.get("batch_size") or max(len(states), 1)
        for i in range(0, len(states), n):
            STAGE_MODULES[self.stage].run(self.backend, self.name, images[i:i + n],
                                          states[i:i + n], ctx, **self.policy)


@dataclasses.dataclass
class Recipe:
    steps: list[Step]
    ctx: Context
    source: dict[str, Any]  # the recipe as read, for meta.json


def _custom_class(spec: str) -> type[Backend]:
    mod, _, cls = spec.partition(":")
    try:
        c = getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise AnnotateError(f"backend {spec!r}: cannot import ({e})") from None
    if not (isinstance(c, type) and issubclass(c, Backend)):
        raise AnnotateError(f"backend {spec!r} is not a umg_jax Backend subclass")
    return c


def load_recipe(path: str) -> Recipe:
    """Reads and checks ``path`` (no model is loaded yet: see :func:`build`)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise AnnotateError(f"--recipe {path} does not exist")
    try:
        src = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AnnotateError(f"--recipe {path}: not JSON ({e})") from None
    if not isinstance(src, dict) or not isinstance(src.get("stages"), list) or not src["stages"]:
        raise AnnotateError(f"--recipe {path}: expected {{\"stages\": [...], ...}} with at "
                            "least one stage")
    unknown = set(src) - {"vocab", "stuff_names", "stages", "description"}
    if unknown:
        raise AnnotateError(f"--recipe {path}: unknown key(s) {sorted(unknown)}")
    base = p.parent

    def rel(x: str | None) -> str | None:
        return None if x is None else str(base / x)

    vocab = src.get("vocab") or []
    if isinstance(vocab, str):
        vp = pathlib.Path(rel(vocab))
        if not vp.is_file():
            raise AnnotateError(f"--recipe {path}: vocab file {vp} does not exist")
        vocab = [v.strip() for v in vp.read_text().splitlines() if v.strip()]
    if not all(isinstance(v, str) for v in vocab):
        raise AnnotateError(f"--recipe {path}: vocab must be a file name or a list of strings")
    stuff_file = rel(src.get("stuff_names"))
    if stuff_file and not pathlib.Path(stuff_file).is_file():
        raise AnnotateError(f"--recipe {path}: stuff_names file {stuff_file} does not exist")
    steps, last = [], 0
    for i, e in enumerate(src["stages"]):
        where = f"--recipe {path}: stages[{i}]"
        if not isinstance(e, dict) or e.get("stage") not in STAGES:
            raise AnnotateError(f"{where}: \"stage\" must be one of {', '.join(STAGES)}")
        stage = e["stage"]
        if STAGES.index(stage) < last:
            raise AnnotateError(f"{where}: {stage!r} after {STAGES[last]!r}; stages run in "
                                f"the order {', '.join(STAGES)}")
        last = STAGES.index(stage)
        policy = dict(STAGE_MODULES[stage].POLICY)
        extra = set(e) - _ENTRY_KEYS - set(RESOURCE_KEYS) - set(policy)
        if extra:
            raise AnnotateError(f"{where} ({stage}): unknown key(s) {sorted(extra)}; policy "
                                f"keys: {', '.join(policy) or 'none'}")
        policy.update({k: v for k, v in e.items() if k in policy})
        name = e.get("backend")
        if stage != "filter" and not name:
            raise AnnotateError(f"{where} ({stage}): needs \"backend\"")
        if not isinstance(e.get("options", {}), dict):
            raise AnnotateError(f"{where}: \"options\" must be an object")
        steps.append(Step(stage, name or "filter", rel(e.get("model")), policy,
                          dict(e.get("options", {})), resources=_check_resources(e, where)))
    if any(s.stage == "tag" for s in steps) and not vocab:
        raise AnnotateError(f"--recipe {path}: a tag stage needs a non-empty \"vocab\"")
    return Recipe(steps, Context(tuple(vocab), load_stuff_names(stuff_file)), src)


def build(recipe: Recipe, device: str, log=print) -> Recipe:
    """Constructs every backend (loads every model) before any image is read, so a wrong model
    directory fails at start."""
    for s in recipe.steps:
        build_step(s, device, log)
    return recipe


def build_step(s: Step, device: str, log=print) -> Step:
    """Constructs one step's backend (loads its model; the filter has none)."""
    if s.stage == "filter":
        return s
    cls = _custom_class(s.name) if ":" in s.name else backend_class(s.stage, s.name)
    if cls.stage != s.stage:
        raise AnnotateError(f"backend {s.name!r} is a {cls.stage} backend, listed under "
                            f"stage {s.stage!r}")
    log(f"loading {s.stage}: {s.name}" + (f" from {s.model}" if s.model else ""))
    s.backend = cls(s.model, device, **s.options)
    return s
