"""The pure-torch core imports neither Lightning nor torchvision; the Lightning layer loads on first use."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "activation_patterns", "alignment", "cffd", "dimension", "errors", "flatness", "functional_model", "gram",
    "hessian", "jacobian", "lanczos", "layer_kinds", "memory", "rank", "symmetries", "trace_estimation", "tracing",
]


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_core_imports_no_lightning_and_no_torchvision() -> None:
    imports = "; ".join(f"import lightning_geomdim.{m}" for m in CORE)
    out = run(f"import sys; import lightning_geomdim; {imports}; "
              "print(sorted(m for m in ('lightning', 'torchmetrics', 'torchvision') if m in sys.modules))")
    assert out == "[]"


def test_lightning_layer_is_imported_on_first_use() -> None:
    out = run("import sys, lightning_geomdim as g; cls = g.GeometryMonitor; "
              "print(cls.__module__, 'lightning' in sys.modules)")
    assert out == "lightning_geomdim.monitor True"
