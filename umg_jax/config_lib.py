"""Loading ``configs/*.py`` files outside absl (tools, tests, the inference API).

The command-line entry points use ``ml_collections.config_flags`` (``--config`` plus
``--config.x=y`` overrides); this is the same loading for code that has a path in hand.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import ml_collections as mlc


def load_config(path: str, arg: str | None = None) -> mlc.ConfigDict:
    """``path`` may carry an argument as ``file.py:arg`` (big_vision style)."""
    if ":" in pathlib.Path(path).name:
        path, arg = path.rsplit(":", 1)
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"umg_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


_FUNC = re.compile(r"^def (\w+?)_config\(")
_KNOB = re.compile(r"^\s*(\w+)((?:\.\w+|\[\"\w+\"\])+)\s*=\s*[^#]+?(?:#\s*(.+))?$")


def knob_comments(config_dir: str | pathlib.Path) -> dict[str, str]:
    """``{dotted key: one-line comment}`` read from the ``x.a.b = value  # comment`` lines of the
    config files in ``config_dir`` (every knob carries such a comment, or a comment block just
    above it). Inside a
    ``def <section>_config()`` function the key is ``<section>.a.b``; in ``get_config`` the
    variable is the root config."""
    out: dict[str, str] = {}
    for f in sorted(pathlib.Path(config_dir).glob("*.py")):
        section, above = "", []
        for line in f.read_text().splitlines():
            if line.strip().startswith("#"):
                above.append(line.strip().lstrip("#").strip())
                continue
            if line.startswith("def get_config"):
                section = ""
                continue
            fm = _FUNC.match(line)
            if fm:
                section = fm.group(1)
                continue
            m = _KNOB.match(line)
            if m and (m.group(3) or above):
                path = re.sub(r'\["(\w+)"\]', r".\1", m.group(2)).lstrip(".")
                key = f"{section}.{path}" if section else path
                out.setdefault(key, (m.group(3) or " ".join(above)).strip())
            above = []
    return out


def describe(config: mlc.ConfigDict, config_dir: str | pathlib.Path) -> str:
    """Every ``--config.<key>=<value>`` override with its current value and its comment (read
    from the files in ``config_dir`` and from the shipped sections, ``umg_jax.configs``)."""
    from umg_jax import configs

    comments = {**knob_comments(configs.DIR), **knob_comments(config_dir)}
    rows = []

    def walk(d: mlc.ConfigDict, prefix: str) -> None:
        for k in sorted(d.keys()):
            v = d[k]
            if isinstance(v, mlc.ConfigDict):
                walk(v, f"{prefix}{k}.")
            else:
                rows.append((f"--config.{prefix}{k}={v!r}", comments.get(prefix + k, "")))

    walk(config, "")
    width = min(max(len(r[0]) for r in rows), 60)
    return "\n".join(f"{a:<{width}}  {b}".rstrip() for a, b in rows)
