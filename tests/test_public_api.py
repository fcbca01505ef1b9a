"""The package root: ``__all__`` is what the docs present, and its names load lazily."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import persona_compass as pc

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "reference" / "api.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
DIRECTIVE = re.compile(r"^::: persona_compass\.([A-Za-z_][\w.]*)\s*$", re.MULTILINE)


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def api_sections() -> tuple[str, str]:
    """The API page's "Top-level names" part and the rest (the modules)."""
    text = API_PAGE.read_text(encoding="utf-8")
    start = text.index("## Top-level names")
    end = text.index("\n## ", start + 1)
    return text[start:end], text[:start] + text[end:]


def test_all_is_the_set_of_documented_top_level_names():
    top, _ = api_sections()
    paths = DIRECTIVE.findall(top)
    documented = {path.rsplit(".", 1)[-1] for path in paths}
    exported = set(pc.__all__) - {"__version__"}
    assert sorted(exported - documented) == [], "exported but not on the API page"
    assert sorted(documented - exported) == [], "on the API page but not exported"
    assert "`pc.__version__`" in API_PAGE.read_text(encoding="utf-8")
    for path in paths:  # each directive shows the very object the root exports
        module, _, name = f"persona_compass.{path}".rpartition(".")
        assert getattr(importlib.import_module(module), name) is getattr(pc, name), path


def test_capping_is_documented_as_the_context_manager():
    """``::: persona_compass.capping`` would render the module of that name, so the page
    documents the function where it is defined, under the root name's anchor."""
    top, _ = api_sections()
    assert "::: persona_compass.interventions.capping" in top
    assert '<a id="persona_compass.capping"></a>' in top


def test_the_api_page_documents_modules_outside_the_top_level_part():
    _, rest = api_sections()
    modules = DIRECTIVE.findall(rest)
    assert modules, "the page documents modules too"
    for name in modules:
        assert importlib.util.find_spec(f"persona_compass.{name}") is not None, name
        assert name not in pc.__all__, f"{name} is a module, not a root name"


def test_names_the_getting_started_page_uses_are_exported():
    text = GETTING_STARTED.read_text(encoding="utf-8")
    used = set(re.findall(r"\bpc\.(\w+)", text))
    linked = set(re.findall(r"reference/api\.md#persona_compass\.(\w+)", text))
    assert used and linked
    assert sorted((used | linked) - set(pc.__all__)) == []


def test_importing_the_package_loads_no_torch():
    out = run_python(
        "import sys, persona_compass as pc; print(pc.__version__); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    assert out.split("\n")[:2] == [pc.__version__, "[]"]


def test_every_exported_name_loads_from_its_module():
    for name in set(pc.__all__) - {"__version__"}:
        value = getattr(pc, name)
        assert value.__module__.startswith("persona_compass."), name
        assert name in dir(pc)


def test_type_checkers_see_the_names_that_load_at_run_time():
    """The ``if TYPE_CHECKING`` imports (mypy, IDEs) and the lazy table name the same things."""
    tree = ast.parse(Path(pc.__file__).read_text(encoding="utf-8"))
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    )
    seen = {
        (imp.module, alias.name)
        for imp in block.body
        if isinstance(imp, ast.ImportFrom)
        for alias in imp.names
    }
    lazy = {(module, name) for module, names in pc._EXPORTS.items() for name in names}
    assert seen == lazy
    assert {name for _, name in lazy} | {"__version__"} == set(pc.__all__)


def test_capping_stays_the_context_manager_when_its_module_is_imported():
    """``persona_compass.capping`` is a submodule and the root's context manager: importing the
    submodule after the package must not rebind the public name."""
    out = run_python(
        "import sys, persona_compass as pc\n"
        "import persona_compass.capping as m\n"
        "from persona_compass.bundle import Bundle  # imports the submodule too\n"
        "from persona_compass.interventions import capping\n"
        "module = sys.modules['persona_compass.capping']\n"
        "print(pc.capping is capping, m is capping, module.CappingConfig is pc.CappingConfig)\n"
    )
    assert out.strip() == "True True True"


def test_submodules_stay_reachable_and_unknown_names_fail():
    out = run_python(
        "import persona_compass as pc; print(pc.engines.__name__, pc.models.DEFAULT_ALIAS)"
    )
    assert out.split() == ["persona_compass.engines", "smollm2-135m"]
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        _ = pc.no_such_name
