"""A Griffe extension for the docs build (mkdocs.yml loads it): the docstrings' house style.

The docstrings in ``src/`` are Google style with two habits Google style does not read:
examples headed ``Example:`` (only ``Examples:`` is a section; ``Example:`` would become an
admonition whose ``>>>`` lines Markdown takes for block quotes), and Sphinx roles such as
``:class:`Axis``` (shown literally). Before a docstring is parsed, this turns the first into
``Examples:`` and each role into plain inline code. The source files are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|const):`~?\.?([^`]+)`")


class HouseStyle(griffe.Extension):
    """Rewrite ``Example:`` headings and Sphinx roles in every docstring Griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        text = _EXAMPLE.sub(r"\1Examples:", docstring.value)
        docstring.value = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
