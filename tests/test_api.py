"""The public surface: every exported name imports and is documented."""

import dataclasses
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
    doc = obj.__doc__  # a class's own: inspect.getdoc would fall back to its base's
    assert doc and doc.strip(), f"lorax_lite.{name} has no docstring"


def section_names(doc: str, title: str) -> set[str] | None:
    """The names a Google-style section (``Args:``, ``Attributes:``) documents; None if absent."""
    if f"\n{title}:\n" not in doc:
        return None
    lines = doc.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {
        line.split(":")[0].strip().lstrip("*")
        for line in lines
        if line.startswith("    ") and not line.startswith("     ") and ":" in line
    }


def documented_signatures() -> list[tuple[str, set[str], set[str]]]:
    """``(name, documented, parameters)`` for every exported function, class and public
    method whose docstring has an Args section, and every exported dataclass or named tuple
    whose docstring has an Attributes section (its fields)."""
    found = []
    for name in ll.__all__:
        obj = getattr(ll, name)
        members = [(name, obj)]
        if inspect.isclass(obj):
            members += [
                (f"{name}.{attr}", value)
                for attr, value in inspect.getmembers(obj)
                if not attr.startswith("_") and callable(value)
            ]
        for member, value in members:
            documented = section_names(inspect.getdoc(value) or "", "Args")
            if documented is not None:
                params = {
                    p.name
                    for p in inspect.signature(value).parameters.values()
                    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"
                }
                found.append((member, documented, params))
        attributes = section_names(inspect.cleandoc(obj.__doc__ or ""), "Attributes")
        if attributes is not None and dataclasses.is_dataclass(obj):
            found.append((name, attributes, {f.name for f in dataclasses.fields(obj)}))
        elif attributes is not None and hasattr(obj, "_fields"):
            found.append((name, attributes, set(obj._fields)))
    return found


DOCUMENTED = documented_signatures()


def test_documented_signatures_cover_functions_classes_and_methods():
    names = {name for name, _, _ in DOCUMENTED}
    assert {"init", "lora", "TrainCheckpointer", "TrainCheckpointer.save", "LoraConfig"} <= names


def test_exported_functions_with_parameters_document_them():
    """An exported function that takes parameters has an Args section (else the check above
    passes vacuously for it)."""
    missing = []
    for name in ll.__all__:
        obj = getattr(ll, name)
        if inspect.isfunction(obj) and inspect.signature(obj).parameters:
            if section_names(inspect.getdoc(obj) or "", "Args") is None:
                missing.append(name)
    assert not missing, f"no Args section: {missing}"


@pytest.mark.parametrize(
    "name, documented, params", DOCUMENTED, ids=[name for name, _, _ in DOCUMENTED]
)
def test_documented_args_match_the_signature(name, documented, params):
    """Where a docstring has an Args section, it names every parameter (Google style); a
    dataclass's or named tuple's Attributes section names every field."""
    assert params <= documented, f"lorax_lite.{name}: undocumented {sorted(params - documented)}"


def test_module_names_are_not_exported_by_accident():
    public = {n for n in dir(ll) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(ll, n))}
    assert public - modules - set(ll.__all__) == set()


def test_all_is_sorted():
    assert ll.__all__ == sorted(ll.__all__)


def test_distributed_is_exported_with_initialize_documented():
    assert "distributed" in ll.__all__ and ll.distributed is importlib.import_module(
        "lorax_lite.distributed"
    )
    doc = inspect.getdoc(ll.distributed.initialize)
    assert "\nArgs:\n" in doc and "coordinator_address" in doc
