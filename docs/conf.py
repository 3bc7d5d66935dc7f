"""Sphinx configuration of the lorax_lite docs (``make docs``).

Offline: no intersphinx inventory is fetched; names of other libraries in signatures are
ignored by the nitpicky check (``nitpick_ignore_regex``), ours must all resolve.
"""

import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))

import lorax_lite  # noqa: E402

project = "lorax_lite"
author = "the lorax_lite authors"
copyright = "2026, the lorax_lite authors"
release = version = lorax_lite.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "results_pages",
    "ll_refs",
    "module_table",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "results/notes"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# Google-style docstrings; types from the annotations, in the signature.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "signature"
python_use_unqualified_type_names = True
autodoc_member_order = "bysource"

# Every reference to one of our names must resolve; other libraries' names (no inventories
# offline) and the typing aliases of signatures are not checked.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(jax|jaxlib|jnp|np|numpy|optax|flax|nn|nnx|orbax|chex|safetensors|os|pathlib)"
        r"(\..*)?",
    ),
    (r"py:.*", r"(typing|collections|collections\.abc|types|enum|dataclasses)\..*"),
    (
        r"py:.*",
        r"(Any|Callable|Sequence|Mapping|Iterable|Iterator|PyTree|Array|ArrayLike|"
        r"DTypeLike|Path|Literal|Optional|Union|NamedTuple|T)",
    ),
    (r"py:class", r"(int|float|str|bool|bytes|dict|list|tuple|object|None|type)"),
]

# Problems in lorax_lite's docstrings found while building these docs, each reported to the
# docstring's owner with its fix; an entry here is dead once the docstring is fixed.
KNOWN_DOCSTRING_ISSUES = [
    # Google "Returns:" written "Phrase: description", which napoleon reads as a type.
    ("py:class", "The LoRA tree"),
    ("py:class", "The metadata dict"),
    # Internal names cross-referenced with single backticks (not part of the API).
    ("py:class", "lorax_lite.train_checkpoint.Restored"),
    ("py:obj", "lorax_lite.decompose"),
    ("py:obj", "lorax_lite.targets.to_serial"),
    ("py:obj", "lorax_lite.decompose.loftq"),
]
nitpick_ignore = KNOWN_DOCSTRING_ISSUES

html_theme = "sphinx_book_theme"
html_title = f"lorax_lite {release}"
html_theme_options = {"show_toc_level": 2, "use_download_button": False}
html_static_path: list[str] = []
default_role = "py:obj"


def _readable_defaults(app, what, name, obj, options, signature, return_annotation):
    """Defaults whose repr is no Python (a dataclass field's ``<factory>``, a function's
    ``<function f at 0x...>``) make the domain print the signature raw, untyped and unlinked:
    show ``...`` and ``f`` instead."""
    if not signature or "<" not in signature:
        return None
    signature = re.sub(r"<function ([\w.]+)(?: at 0x[0-9a-f]+)?>", r"\1", signature)
    return re.sub(r"<[^<>]*>", "...", signature), return_annotation


def setup(app):
    app.connect("autodoc-process-signature", _readable_defaults)
