"""How to install one of pop3frame's optional extras (setup.cfg), as a command to copy.

A message about a missing optional package ends with :func:`install_hint`.
``pip install 'pop3frame[feeds]'`` alone is wrong where people first meet
these messages: in the README's quick start ``pip`` is not on the PATH (the
venv is not activated) and the package comes from the checkout, not from an
index.  So the hint names the Python that is running, and, for a checkout
(an editable install, whose source tree holds setup.cfg), the checkout::

    .venv/bin/python -m pip install -e '.[feeds]'

Paths inside the current directory are shown relative to it.
"""
from __future__ import annotations

import os
import shlex
import sys

__all__ = ["install_hint"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shown(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` (``"feeds"``, ``"postgres"`` ...) for this Python."""
    if os.path.exists(os.path.join(_ROOT, "setup.cfg")):
        target = "-e " + shlex.quote("%s[%s]" % (_shown(_ROOT), extra))
    else:
        target = shlex.quote("pop3frame[%s]" % extra)
    return "%s -m pip install %s" % (shlex.quote(_shown(sys.executable or "python3")), target)
