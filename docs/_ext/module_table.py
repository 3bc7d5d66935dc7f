"""Sphinx extension: the ``module-table`` directive, a table of lorax_lite's modules.

One row per module of the package, with the first line of its docstring (as plain text), read
at build time: the table follows the code as modules are split or renamed.
"""

from __future__ import annotations

import importlib
import pkgutil

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def module_rows(package: str = "lorax_lite") -> list[tuple[str, str]]:
    """``(module name, its docstring's first line)`` for every module of ``package``."""
    root = importlib.import_module(package)
    rows = [(package, (root.__doc__ or "").strip().splitlines()[0])]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        module = importlib.import_module(info.name)
        summary = (module.__doc__ or "").strip().splitlines()
        rows.append((info.name, summary[0] if summary else ""))
    return rows


def _row(*cells: nodes.Node) -> nodes.row:
    row = nodes.row()
    for cell in cells:
        entry = nodes.entry()
        entry += nodes.paragraph("", "", cell)
        row += entry
    return row


class ModuleTable(SphinxDirective):
    def run(self):
        group = nodes.tgroup(cols=2)
        group += [nodes.colspec(colwidth=1), nodes.colspec(colwidth=3)]
        head = nodes.thead()
        head += _row(nodes.Text("module"), nodes.Text("its idea"))
        body = nodes.tbody()
        for name, summary in module_rows():
            body += _row(nodes.literal(text=name), nodes.Text(summary.replace("`", "")))
        group += [head, body]
        table = nodes.table()
        table += group
        return [table]


def setup(app):
    app.add_directive("module-table", ModuleTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
