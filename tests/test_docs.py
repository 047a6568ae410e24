"""What docs/ tells an operator to build or run holds for this tree."""
from __future__ import annotations

import configparser
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build_inputs():
    """Every file and directory ``pip install .`` reads, from setup.cfg itself."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    needed = {"pyproject.toml", "setup.cfg", "setup.py"}
    needed.add(cfg["metadata"]["long_description"].replace("file:", "").strip())
    needed.update(cfg["metadata"]["license_files"].split())
    needed.update(line.split("=")[1].strip() for line in cfg["options"]["package_dir"].strip().splitlines())
    return needed


@pytest.mark.parametrize("dockerfile", ["docs/Dockerfile", "docs/compose/Dockerfile"])
def test_dockerfile_copies_what_the_install_needs(dockerfile):
    """The image's ``pip install '.[...]'`` builds from what COPY put in /src:
    docs/Dockerfile lacked pyproject.toml, so its build did not go through
    the PEP 517 backend the repository declares."""
    copied = set()
    for line in (ROOT / dockerfile).read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(p.rstrip("/") for p in line.split()[1:-1])
    assert build_inputs() <= copied, build_inputs() - copied
    assert re.search(r"^RUN pip install --no-cache-dir '\.\[", (ROOT / dockerfile).read_text(), re.M)
