"""`lmzoo.configs`: the shipped run configs are found from a checkout and from an installed wheel, and a
missing one is an error naming the file (compare-archs no longer falls back to a preset)."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lmzoo
from lmzoo import configs
from lmzoo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
IN_REPO = sorted((ROOT / "configs").glob("*/*.yaml"))


def test_every_shipped_file_is_found_by_name():
    found = configs.shipped()
    assert sorted(f"{f}/{n}" for f, names in found.items() for n in names) == [
        f"{p.parent.name}/{p.stem}" for p in IN_REPO]
    for p in IN_REPO:
        assert configs.path(p.parent.name, p.stem).read_bytes() == p.read_bytes()


def test_a_missing_config_is_an_error_naming_the_file():
    with pytest.raises(ConfigError, match=r"vit/tiny\.yaml: no shipped config 'vit/tiny'; shipped: \[.*'llama/tiny'"):
        configs.path("vit")


def test_compare_archs_does_not_fall_back_to_a_preset(monkeypatch, tmp_path):
    from lmzoo.cli.compare_archs import base_config

    tok = lmzoo.train_tokenizer("sp-bpe", texts=["the cat sat on the mat"] * 20, vocab_size=300)
    monkeypatch.setattr(configs, "ROOT", tmp_path)  # an install whose configs went missing
    with pytest.raises(ConfigError, match=f"{tmp_path / 'llama' / 'tiny.yaml'}: no shipped config"):
        base_config("llama", tok, None)


@pytest.mark.slow
def test_a_wheel_carries_the_configs_and_finds_them_installed(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel needs setuptools")
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "lmzoo", src / "lmzoo", ignore=ignore)
    shutil.copytree(ROOT / "configs", src / "configs", ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("lmzoo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"lmzoo/configs/{p.parent.name}/{p.name}" for p in IN_REPO} | {"lmzoo/configs/__init__.py"}
    assert want <= names
    assert not any(n.startswith("configs/") for n in names)  # nothing at the top level of site-packages
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import lmzoo, lmzoo.configs as c; print(lmzoo.__file__); print(c.path('llama'))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == [str(site / "lmzoo" / "__init__.py"), str(site / "lmzoo" / "configs" / "llama" / "tiny.yaml")]


def test_shared_data_is_found_through_one_locator():
    """Every test that reads ../shared/data goes through tests/shared_data.py, so LMZOO_SHARED_DATA and
    LMZOO_REQUIRE_SHARED_DATA reach it (a private path would skip silently in CI)."""
    root = Path(__file__).resolve().parent
    needle = '"' + "sha" + "red" + '"'  # the path component a private locator spells out (built so this file lacks it)
    private = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if p.name != "shared_data.py" and needle in p.read_text(encoding="utf-8")]
    assert not private, f"tests that locate the shared data themselves: {private}"
