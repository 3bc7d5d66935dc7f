"""Sphinx extension: resolve the short names docstrings use for our API.

Docstrings write `ll.merge` (the package as users import it), `merge`, `ll.lora(fn)` or
`AdapterSet.select`;
each resolves to the documented ``lorax_lite.X`` (or ``lorax_lite.targets.X`` /
``lorax_lite.quant.X``). Anything else stays unresolved, and the nitpicky build fails on it.
"""

from __future__ import annotations

PREFIXES = ("lorax_lite.", "lorax_lite.targets.", "lorax_lite.quant.")


def candidates(target: str) -> list[str]:
    target = target.split("(")[0]  # `ll.lora(fn)` names ll.lora
    if target.startswith("ll."):
        target = target[len("ll.") :]
    elif target.startswith("lorax_lite."):
        return []
    return [prefix + target for prefix in PREFIXES]


def resolve(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    for target in candidates(node["reftarget"]):
        found = domain.resolve_any_xref(env, node["refdoc"], app.builder, target, node, contnode)
        if found:
            return found[0][1]
    return None


def setup(app):
    app.connect("missing-reference", resolve)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
