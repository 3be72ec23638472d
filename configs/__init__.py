"""The shipped run configs, ``configs/<family>/<name>.yaml``, read the same way from a checkout and an install.

The folder stays at the repository root (the house layout); setup.py installs it as the package
``lmzoo.configs``, so a wheel carries the YAML files and an editable install maps this folder:

    from lmzoo import configs
    configs.path("llama")        # .../configs/llama/tiny.yaml (ConfigError naming the file if it is missing)
    configs.shipped()            # {"bert": ["tiny"], ..., "t5": ["tiny"]}
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.errors import ConfigError

ROOT = Path(__file__).resolve().parent


def shipped() -> dict[str, list[str]]:
    """family -> the names of its shipped configs."""
    out: dict[str, list[str]] = {}
    for p in sorted(ROOT.glob("*/*.yaml")):
        out.setdefault(p.parent.name, []).append(p.stem)
    return out


def path(family: str, name: str = "tiny") -> Path:
    """The file of the shipped config ``<family>/<name>.yaml``."""
    p = ROOT / family / f"{name}.yaml"
    if not p.is_file():
        raise ConfigError(f"{p}: no shipped config '{family}/{name}'; shipped: "
                          f"{sorted(f'{f}/{n}' for f, names in shipped().items() for n in names)}")
    return p
