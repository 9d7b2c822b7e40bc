"""The layering of DESIGN.md: a module imports only its own layer or the ones below.

Reads the sources with ``ast`` (nothing is imported or executed), so a function-level
import counts as much as a top-level one. A new module must be placed in LAYERS.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "filter"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# Module names relative to the package; "x.*" covers every submodule of package x.
LAYERS: dict[str, int] = {
    # L0 pure core
    "__init__": 0,
    "model": 0,
    "replies": 0,
    "units": 0,
    "netaddr": 0,
    "xtext": 0,
    "proxyproto": 0,
    "headers": 0,
    "smtpdata": 0,
    "smtpsyntax": 0,
    "results": 0,
    "domains": 0,
    # L1 pure logic
    "verdict": 1,
    "message": 1,
    "limits": 1,
    "policy": 1,
    "policy.schema": 1,
    "policy.loader": 1,
    "policy.render": 1,
    "lists": 1,
    "authresults": 1,
    "dmarc": 1,
    "greylist": 1,
    "dnsbl": 1,
    "storeurl": 1,  # judges a redis.url with redis-py's parser; opens no socket
    # L2 adapters
    "metrics": 2,
    "logs": 2,
    "smtpstream": 2,
    "httpapi": 2,
    "dnsfeatures": 2,  # a dnspython switch, set before the resolver loads
    "resolver": 2,
    "resolver.*": 2,
    "dkimkeys": 2,
    "verdictlog": 2,
    "domaincheck": 2,
    "redisscripts": 2,
    "store": 2,
    "store.*": 2,
    # L3 checks
    "checks": 3,
    "checks.*": 3,
    # L4 orchestration
    "pipeline": 4,
    "session": 4,
    "dryrun": 4,
    "replay": 4,
    # L5 protocol I/O
    "frontend": 5,
    "relay": 5,
    # L6 composition
    "app": 6,
    "cli": 6,
    "__main__": 6,
}
NAMES = {0: "pure core", 1: "pure logic", 2: "adapters", 3: "checks", 4: "orchestration"}
NAMES |= {5: "protocol I/O", 6: "composition"}


def layer_of(module: str) -> int | None:
    if module in LAYERS:
        return LAYERS[module]
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        wildcard = ".".join(parts[:i]) + ".*"
        if wildcard in LAYERS:
            return LAYERS[wildcard]
    return None


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()  # a package is named like its folder
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


@dataclass(frozen=True)
class Import:
    where: str  # file:line
    source: str
    target: str


def resolve(root: Path, dotted: str) -> str:
    """The package-relative module a dotted name (without the package) refers to."""
    parts = dotted.split(".") if dotted else []
    while parts:
        candidate = root.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()  # "filter.policy.DEFAULT_POLICY": an attribute of a module
    return "__init__"


def imports_of(path: Path, root: Path) -> list[Import]:
    source = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = f"{path.relative_to(root.parent)}"
    out = []
    # The package a relative import is relative to.
    base = source.split(".") if is_package(path) else source.split(".")[:-1]
    if source == "__init__":
        base = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    targets.append(alias.name[len(PACKAGE) + 1 :])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join([*up, *([node.module] if node.module else [])])
            elif node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
                prefix = (node.module or "")[len(PACKAGE) + 1 :]
            else:
                continue
            # "from filter import replies" imports a module; "from filter import
            # __version__" an attribute of the package.
            for alias in node.names:
                name = f"{prefix}.{alias.name}" if prefix else alias.name
                targets.append(name)
        for target in targets:
            out.append(Import(f"{here}:{node.lineno}", source, resolve(root, target)))
    return out


def check_layers(root: Path) -> tuple[list[str], list[str], list[Import]]:
    """(upward-import violations, modules missing from LAYERS, all imports seen)."""
    violations: list[str] = []
    unknown: list[str] = []
    seen: list[Import] = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        if layer_of(name) is None:
            unknown.append(f"{path.relative_to(root.parent)} (module {name!r})")
            continue
        for imp in imports_of(path, root):
            seen.append(imp)
            src, dst = layer_of(imp.source), layer_of(imp.target)
            if dst is None:
                unknown.append(f"{imp.target!r}, imported at {imp.where}")
            elif src is not None and dst > src:
                violations.append(
                    f"{imp.where}: {imp.source} (L{src} {NAMES[src]}) imports "
                    f"{imp.target} (L{dst} {NAMES[dst]})"
                )
    return violations, unknown, seen


def test_no_upward_imports() -> None:
    violations, unknown, _ = check_layers(ROOT)
    assert not unknown, (
        "modules not in the layer map; add each to LAYERS in tests/unit/test_layers.py "
        "(see the layers in DESIGN.md):\n  " + "\n  ".join(unknown)
    )
    assert not violations, "upward imports:\n  " + "\n  ".join(violations)


def test_the_walker_sees_real_imports() -> None:
    _, _, seen = check_layers(ROOT)
    edges = {(i.source, i.target) for i in seen}
    # A few edges known to exist, of each import form.
    assert ("pipeline", "checks") in edges  # from filter.checks import Check
    assert ("verdict", "replies") in edges  # from filter import replies
    assert ("verdict", "policy.schema") in edges
    assert ("metrics", "__init__") in edges  # from filter import __version__
    assert ("cli", "app") in edges  # a function-level import
    assert ("checks.registry", "checks") in edges
    assert all(":" in i.where and i.where.startswith(PACKAGE + "/") for i in seen)


def _fake_package(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / PACKAGE
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({"model.py": "from filter.session import Session\n"}, "filter/model.py:1: model (L0"),
        ({"verdict.py": "import filter.metrics\n"}, "verdict (L1 pure logic) imports metrics"),
        (
            {"checks/__init__.py": "", "checks/spf.py": "\n\nfrom filter.relay import x\n"},
            "filter/checks/spf.py:3: checks.spf (L3 checks) imports relay (L5",
        ),
        ({"headers.py": "def f():\n    from filter import pipeline\n"}, "filter/headers.py:2"),
        (
            {"policy/__init__.py": "", "policy/schema.py": "from ..checks import registry\n"},
            "policy.schema (L1 pure logic) imports checks",
        ),
        ({"smtpdata.py": "from . import frontend\n"}, "smtpdata (L0 pure core) imports frontend"),
    ],
)
def test_upward_imports_are_caught(tmp_path: Path, files: dict[str, str], needle: str) -> None:
    targets = {"session.py", "metrics.py", "relay.py", "pipeline.py", "frontend.py"}
    extra = {name: "" for name in targets}
    root = _fake_package(tmp_path, {**extra, "checks/__init__.py": "", **files})
    violations, unknown, _ = check_layers(root)
    assert not unknown
    assert any(needle in v for v in violations), violations


def test_same_and_lower_layers_are_fine(tmp_path: Path) -> None:
    files = {
        "session.py": "from filter.pipeline import Pipeline\nfrom filter import replies\n",
        "pipeline.py": "from filter.checks import Check\n",
        "checks/__init__.py": "from filter.message import MessageBuffer\n",
        "checks/dkim.py": "from filter.checks import Context\n",
        "message.py": "from filter.headers import x\nimport os\n",
        "headers.py": "from filter import __version__\n",
        "replies.py": "",
    }
    violations, unknown, _ = check_layers(_fake_package(tmp_path, files))
    assert (violations, unknown) == ([], [])


def test_unknown_module_fails_with_a_hint(tmp_path: Path) -> None:
    root = _fake_package(tmp_path, {"shiny.py": "from filter import model\n", "model.py": ""})
    _, unknown, _ = check_layers(root)
    assert unknown == ["filter/shiny.py (module 'shiny')"]
