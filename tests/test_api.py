"""The public surface: every exported name imports and is documented."""

import importlib
import inspect

import pytest

import lorax_lite as ll


def test_version_and_all_are_declared():
    assert isinstance(ll.__version__, str) and ll.__version__
    assert len(set(ll.__all__)) == len(ll.__all__)
    for name in ("LoraConfig", "init", "lora", "partition", "combine", "merge", "optimizer"):
        assert name in ll.__all__


@pytest.mark.parametrize("name", ll.__all__)
def test_exported_name_imports_and_has_a_docstring(name):
    module = importlib.import_module("lorax_lite")
    obj = getattr(module, name)
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"lorax_lite.{name} has no docstring"


@pytest.mark.parametrize("name", ll.__all__)
def test_documented_args_match_the_signature(name):
    """Where a docstring has an Args section, it names every parameter (Google style)."""
    obj = getattr(ll, name)
    doc = inspect.getdoc(obj) or ""
    if not callable(obj) or inspect.isclass(obj) or "\nArgs:\n" not in doc:
        return
    args_section = doc.split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    documented = {
        line.split(":")[0].strip().lstrip("*")
        for line in args_section.splitlines()
        if line.startswith("    ") and not line.startswith("     ") and ":" in line
    }
    params = {
        p.name
        for p in inspect.signature(obj).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    assert params <= documented, f"lorax_lite.{name}: undocumented {sorted(params - documented)}"


def test_module_names_are_not_exported_by_accident():
    public = {n for n in dir(ll) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(ll, n))}
    assert public - modules - set(ll.__all__) == set()
