"""The methods layer's shape: a method file never imports another method file, and the engine never imports methods.

Methods share code only through modules that register nothing (``operations.py``, ``common.py``, ``ties_core.py``...),
so changing one method cannot silently change another, and the engine's contract stays the engine's.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hf_fusion"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str) -> set[str]:
    """Every module a file may import: ``import a.b``, ``from a import b`` (a or a.b), relative imports resolved."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _registers(tree: ast.Module) -> bool:
    """Whether the file calls ``register(...)``, which is what makes it a method file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name == "register":
                return True
    return False


def _parsed(folder: str) -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted((PACKAGE / folder).rglob("*.py"))}


def test_the_import_scan_sees_every_spelling() -> None:
    source = (
        "import hf_fusion.methods.a\nfrom hf_fusion.methods import b\nfrom hf_fusion.methods.c import X\n"
        "from .d import Y\nfrom . import e\ndef f():\n    from hf_fusion.methods.g import Z\n"
    )
    found = _imports(ast.parse(source), "hf_fusion.methods.here")
    assert {f"hf_fusion.methods.{m}" for m in "abcdeg"} <= found
    assert _registers(ast.parse("SPEC = register(MethodSpec(name='x'))"))
    assert not _registers(ast.parse("from hf_fusion.registry import register"))


def test_no_method_file_imports_another_method_file() -> None:
    modules = _parsed("methods")
    methods = {name for name, tree in modules.items() if _registers(tree)}
    assert {"hf_fusion.methods.ties_merging", "hf_fusion.methods.dare", "hf_fusion.methods.slerp"} <= methods
    offences = [
        f"{name} imports {other}"
        for name in sorted(methods)
        for other in sorted((_imports(modules[name], name) & methods) - {name})
    ]
    hint = "move what they share to a module that registers nothing (operations.py)"
    assert not offences, hint + ":\n" + "\n".join(offences)


def test_the_engine_does_not_import_the_methods() -> None:
    offences = sorted(
        name
        for name, tree in _parsed("engine").items()
        if any(m == "hf_fusion.methods" or m.startswith("hf_fusion.methods.") for m in _imports(tree, name))
    )
    assert not offences, f"the engine drives its own contract (engine/contract.py), not the methods: {offences}"
