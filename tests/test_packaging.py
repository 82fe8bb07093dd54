"""Packaging: the wheel holds every package of the source tree and the named configs (the CI script also
installs the wheel into a fresh environment and trains from it, see .ci/wheel-check)."""

import tomllib
from pathlib import Path

from setuptools import find_namespace_packages

from hope_scale.resources import config_dir

REPO = Path(__file__).resolve().parents[1]


def test_every_package_and_the_named_configs_are_listed():
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {p for p in find_namespace_packages(str(REPO), include=["hope_scale*", "data_prep*"])
             if "__pycache__" not in p}
    assert found <= set(setup["packages"])
    assert setup["package-dir"]["hope_scale.configs"] == "configs"
    shipped = {f"{kind}/{p.name}" for kind in ("model", "train") for p in (REPO / "configs" / kind).glob("*.yaml")}
    patterns = setup["package-data"]["hope_scale.configs"]
    assert all(any(Path(f).match(pat) for pat in patterns) for f in shipped) and shipped
    assert not [p for p in (REPO / "configs").rglob("*") if p.is_file() and p.suffix != ".yaml"]


def test_named_configs_resolve_from_the_checkout():
    assert config_dir("model") == REPO / "configs" / "model" and config_dir("train") == REPO / "configs" / "train"
