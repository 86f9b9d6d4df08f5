"""Schemathesis's command line with `ast.parse` serialised across its worker threads.

CPython 3.11 keeps the AST constructor's recursion depth in per-interpreter state (python/cpython
gh-106905), so two workers whose hypothesis strategies describe their filter lambdas at the same time
can raise "SystemError: AST constructor recursion depth mismatch" and end the run with an error.
"""

from __future__ import annotations

import ast
import threading

_parse = ast.parse
_lock = threading.Lock()


def _serial_parse(*args, **kwargs):
    with _lock:
        return _parse(*args, **kwargs)


ast.parse = _serial_parse

if __name__ == "__main__":
    import schemathesis.cli

    schemathesis.cli.schemathesis()
