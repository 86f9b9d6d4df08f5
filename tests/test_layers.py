"""The layers hold: every import in the source tree (function-level ones too) is checked with `ast`.

- `models/` is pure model code: never Ray, `deployments/`, `serve_app/` or `autoscaling/`.
- `deployments/` wraps models as Serve deployments: never `serve_app/`.
- `autoscaling/` is policy and capacity math: never `deployments/` or `serve_app/`.
- `serve_app/session/` is the live session's logic, unit-tested without Ray: never Ray or `deployments/`
  (it reaches the models through the handles it is given).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = {
    "models": ("ray", "deployments", "serve_app", "autoscaling"),
    "deployments": ("serve_app",),
    "autoscaling": ("deployments", "serve_app"),
    "serve_app/session": ("ray", "deployments"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for folder, banned in RULES.items():
        for path in sorted((root / folder).rglob("*.py")):
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                if top in banned:
                    found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def test_layers_hold():
    assert violations() == []


def test_the_check_finds_a_violation(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.py").write_text("def f():\n    from serve_app.db import Store\n    import ray.serve\n")
    assert violations(tmp_path) == ["models/bad.py:2 imports serve_app.db", "models/bad.py:3 imports ray.serve"]
