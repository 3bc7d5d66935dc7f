"""The docs site (docs/): every public name has a reference entry, every page's code runs, and
the site builds with warnings as errors.

Code blocks: each page's ```python blocks run in order in one namespace, in a fresh working
directory. A page may start from the namespace another page leaves (``% test: continues
PAGE``), need packages (``% test: needs MODULE ...``: skipped without them) or be slow
(``% test: slow``). A block whose first line is ``# not run by the tests: <why>`` is only
compiled, and so is one whose first line is ``# needs: MODULE ...`` where a module is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import pathlib
import re
import subprocess
import sys
import types

import pytest

import lorax_lite as ll
from lorax_lite import distributed, quant, targets

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIPPED_DIRS = {"_build", "_ext", "generated", "notes"}
PAGES = sorted(p for p in DOCS.rglob("*.md") if not SKIPPED_DIRS & set(p.relative_to(DOCS).parts))
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_RUN = "# not run by the tests:"
BLOCK_NEEDS = "# needs:"
CONTINUES = re.compile(r"^% test: continues (\S+)$", re.M)
NEEDS = re.compile(r"^% test: needs (.+)$", re.M)
AUTODOC = re.compile(r"^\.\. auto(?:function|class|exception|data|module):: (\S+)", re.M)


def code_blocks(page: pathlib.Path) -> list[tuple[int, str]]:
    """``(line number of the block's first line, code)`` of each ```python block."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start(1)), m.group(1)) for m in FENCE.finditer(text)]


def missing_modules(code: str) -> list[str]:
    """The modules a ``# needs: MODULE ... (why)`` first line names that are not installed."""
    first = code.splitlines()[0]
    if not first.startswith(BLOCK_NEEDS):
        return []
    names = first[len(BLOCK_NEEDS) :].split("(")[0].split()
    return [m for m in names if importlib.util.find_spec(m) is None]


def run_page(page: pathlib.Path, namespace: dict | None = None) -> dict:
    """Runs the page's blocks (after the page it continues) and returns the namespace."""
    text = page.read_text()
    if namespace is None:
        namespace = {"__name__": f"docs_{page.stem}"}
        for previous in CONTINUES.findall(text):
            run_page(page.parent / previous, namespace)
    for line, code in code_blocks(page):
        source = "\n" * line + code  # tracebacks point at the page's own lines
        compiled = compile(source, str(page), "exec")
        if not code.startswith(NOT_RUN) and not missing_modules(code):
            exec(compiled, namespace)
    return namespace


def page_marks(page: pathlib.Path) -> list:
    text = page.read_text()
    marks = [pytest.mark.slow] if "\n% test: slow\n" in f"\n{text}" else []
    needed = [m for line in NEEDS.findall(text) for m in line.split()]
    missing = [m for m in needed if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        marks.append(pytest.mark.skip(reason=f"needs {', '.join(missing)}"))
    return marks


CODE_PAGES = [p for p in PAGES if code_blocks(p)]


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=page_marks(p), id=str(p.relative_to(DOCS))) for p in CODE_PAGES],
)
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        run_page(page)


def test_every_not_run_block_says_why():
    for page in CODE_PAGES:
        for line, code in code_blocks(page):
            first = code.splitlines()[0]
            if first.startswith("# not run"):
                assert first.startswith(NOT_RUN) and first[len(NOT_RUN) :].strip(), (
                    f"{page}:{line + 1}: write '{NOT_RUN} <the reason>'"
                )


def test_the_docs_have_code_to_run():
    """The parametrized test above would pass vacuously on an empty or misparsed docs tree."""
    assert len(CODE_PAGES) >= 10
    runnable = [c for p in CODE_PAGES for _, c in code_blocks(p) if not c.startswith(NOT_RUN)]
    assert len(runnable) >= 20


def resolve(dotted: str) -> object:
    """The object a dotted name of the reference names (``lorax_lite.quant.from_gguf``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def defined_in(module: types.ModuleType) -> dict[str, object]:
    """The public functions and classes a module defines itself (not those it imports)."""
    return {
        f"{module.__name__}.{name}": value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and getattr(value, "__module__", None) == module.__name__
    }


def required_entries() -> dict[str, object]:
    """Every name the reference must document: ``lorax_lite.__all__``, ``lorax_lite.quant``,
    ``lorax_lite.distributed`` and the predicates of ``lorax_lite.targets``."""
    required = {f"lorax_lite.{name}": getattr(ll, name) for name in ll.__all__}
    required |= defined_in(quant) | defined_in(distributed)
    required |= {
        f"lorax_lite.targets.{name}": value
        for name, value in vars(targets).items()
        if isinstance(value, type)
        and issubclass(value, targets.Predicate)
        and not name.startswith("_")
    }
    return required


def documented_entries() -> dict[str, object]:
    names = [
        n for page in (DOCS / "reference").glob("*.md") for n in AUTODOC.findall(page.read_text())
    ]
    return {name: resolve(name) for name in names}


def test_every_public_name_has_a_reference_entry():
    documented = {id(obj) for obj in documented_entries().values()}
    missing = sorted(name for name, obj in required_entries().items() if id(obj) not in documented)
    assert not missing, f"public names without an entry under docs/reference/: {missing}"


def test_the_reference_names_only_what_exists_and_as_lorax_lite():
    """Every entry resolves, and each name of ``__all__`` is documented as ``lorax_lite.X``
    (where users reach it), not under the module that happens to define it."""
    documented = documented_entries()
    assert all(name.startswith("lorax_lite.") for name in documented), sorted(documented)
    missing = sorted(n for n in ll.__all__ if f"lorax_lite.{n}" not in documented)
    assert not missing, f"document these as lorax_lite.X: {missing}"


def test_results_pages_are_generated_from_every_results_file(tmp_path):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import results_pages
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    files = results_pages.result_files(ROOT / "experiments" / "results")
    on_disk = sorted(ROOT.glob("experiments/results/*.md")) + sorted(
        ROOT.glob("experiments/results/*/*.md")
    )
    assert sorted(files.values()) == on_disk
    for name, source in files.items():
        page = results_pages.page_text(name, source, ROOT)
        headings = re.findall(r"^(#+) ", page, re.M)
        assert headings[0] == "#" and "#" not in headings[1:], name  # one title
        levels = [len(h) for h in headings]
        assert all(b <= a + 1 for a, b in zip(levels, levels[1:])), name  # no level skipped
        for row in (line for line in source.read_text().splitlines() if line.startswith("|")):
            assert row in page, f"{name}: table row missing: {row}"


BUILD_PACKAGES = ("sphinx", "myst_parser", "sphinx_book_theme")


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in BUILD_PACKAGES),
    reason="needs the docs extra (pip install -e '.[docs]', make docs)",
)
def test_the_docs_build_with_warnings_as_errors(tmp_path):
    """What ``make docs`` runs, into a fresh folder (no cached environment)."""
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    assert (tmp_path / "html" / "reference" / "core.html").exists()
    assert (tmp_path / "html" / "results" / "generated" / "llm.html").exists()


def test_getting_started_runs_the_readme_quickstart():
    """The landing page and the docs show one quickstart (tests/test_readme.py checks what it
    does)."""
    quickstart = re.compile(r"^## Quickstart\n.*?^```python\n(.*?)^```", re.S | re.M)
    readme = quickstart.search((ROOT / "README.md").read_text())
    docs = quickstart.search((DOCS / "getting_started.md").read_text())
    assert readme and docs and readme.group(1) == docs.group(1)


def test_readme_links_point_at_files_that_exist():
    """The landing page links into docs/ and experiments/results/ (GitHub renders them)."""
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert "docs/tutorials/qlora_smollm2.md" in local  # QLoRA + PEFT, one click away
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


NUMBER = re.compile(
    r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w,])|(?<![\w.,])\d+\.\d+|(?<![\w.,])\d{2,}(?![\w.,])"
)
ELSEWHERE = re.compile(r"^% figures from elsewhere: (.*)$", re.M)


def results_figures(paths: list[pathlib.Path]) -> list[float]:
    """Every number of these results files and their JSON twins."""
    text = ""
    for path in paths:
        text += path.read_text()
        if path.with_suffix(".json").exists():
            text += path.with_suffix(".json").read_text()
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


def unquoted(text: str, have: list[float]) -> list[str]:
    """The figures of ``text`` that no number of ``have`` rounds to (at the figure's decimals)."""
    missing = []
    for figure in NUMBER.findall(text):
        decimals = len(figure.split(".")[1]) if "." in figure else 0
        value = float(figure.replace(",", ""))
        if not any(round(h + 1e-9, decimals) == value for h in have):
            missing.append(figure)
    return missing


def test_results_notes_quote_their_results_files():
    """A note (the hand-written reading above a generated results page) quotes figures of its
    results file (Markdown or JSON, to the note's decimals); a figure from elsewhere is listed
    on its '% figures from elsewhere:' line. A rerun that changes a figure fails here until the
    note is read again."""
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import results_pages
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    checked = 0
    for name, source in results_pages.result_files(ROOT / "experiments" / "results").items():
        note = DOCS / "results" / "notes" / f"{name}.md"
        if not note.exists():
            continue
        text = note.read_text()
        elsewhere = {n for line in ELSEWHERE.findall(text) for n in line.split()}
        text = ELSEWHERE.sub("", text)
        missing = [f for f in unquoted(text, results_figures([source])) if f not in elsewhere]
        assert not missing, f"docs/results/notes/{name}.md quotes {missing}, not in {source.name}"
        checked += len(NUMBER.findall(text))
    assert checked > 100


def headline_rows(text: str, section: str, link: str) -> list[tuple[str, list[str]]]:
    """``(result cell, linked results names)`` of each row of the table under ``section``."""
    body = text[text.index(section) :]
    table = re.search(r"^\|.*?(?=^[^|])", body, re.S | re.M).group(0)
    rows = [line.split("|") for line in table.splitlines()[2:]]
    return [(cells[2], re.findall(link, cells[3])) for cells in rows]


@pytest.mark.parametrize(
    "page, section, link",
    [
        ("README.md", "## Headline results", r"\(experiments/results/([\w/.-]+)\.md\)"),
        ("docs/results/index.md", "# Results", r"project:#results-([\w.-]+)\)"),
    ],
)
def test_headline_results_quote_the_files_they_link(page, section, link):
    rows = headline_rows((ROOT / page).read_text(), section, link)
    assert len(rows) >= 6
    for result, names in rows:
        assert names, f"{page}: a headline row links to no results file: {result}"
        paths = [ROOT / "experiments" / "results" / f"{name}.md" for name in names]
        missing = unquoted(result, results_figures(paths))
        assert not missing, f"{page}: {missing} are not in {names}"


def test_the_rules_table_lists_every_registered_primitive():
    """explanation/lora_transform.md's table names each primitive lora(fn) has a rule for, as
    the running JAX spells it (the registry is read, so a new rule needs a row)."""
    from lorax_lite import transform

    page = (DOCS / "explanation" / "lora_transform.md").read_text()
    table = page[page.index("| primitive | rule |") :].split("\n\n")[0]
    named = set(re.findall(r"`([\w]+)`", "\n".join(r.split("|")[1] for r in table.splitlines())))
    missing = sorted(set(transform.RULES) - named)
    assert not missing, f"primitives with a rule but no row in lora_transform.md: {missing}"
