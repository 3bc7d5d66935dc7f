"""The docstring examples of every lorax_lite module run as doctests, so they cannot drift."""

import doctest
import importlib
import pkgutil

import pytest

import lorax_lite

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _runnable(test: doctest.DocTest) -> bool:
    """Whether ``test`` has an example not marked ``+SKIP`` (Python 3.11 counts no skipped
    example in ``DocTestRunner.tries``; 3.13 counts them)."""
    return any(not example.options.get(doctest.SKIP) for example in test.examples)


def _examples() -> dict[str, list[doctest.DocTest]]:
    """``{module: its docstring tests}`` for every module with an example."""
    found = {}
    for info in pkgutil.iter_modules(lorax_lite.__path__):
        module = importlib.import_module(f"lorax_lite.{info.name}")
        tests = [t for t in doctest.DocTestFinder().find(module) if _runnable(t)]
        if tests:
            found[info.name] = tests
    return found


EXAMPLES = _examples()


def test_the_package_has_examples():
    examples = [e for tests in EXAMPLES.values() for t in tests for e in t.examples]
    assert sum(not e.options.get(doctest.SKIP) for e in examples) >= 40


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_examples_run(name):
    runner = doctest.DocTestRunner(verbose=False, optionflags=FLAGS)  # not -v of sys.argv
    failures = []
    for test in EXAMPLES[name]:
        runner.run(test, out=failures.append)
    assert not failures, "".join(failures)
    assert runner.tries > 0  # not every example skipped
