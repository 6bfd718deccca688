"""The pure-torch core imports neither Lightning nor torchvision; the Lightning layer loads on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning_geomdim

CORE = sorted(f.stem for f in (Path(lightning_geomdim.__file__).parent / "core").glob("*.py") if f.stem != "__init__")


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_core_imports_no_lightning_and_no_torchvision() -> None:
    assert len(CORE) >= 15, CORE  # every module of lightning_geomdim/core, found on disk
    imports = "; ".join(f"import lightning_geomdim.core.{m}" for m in CORE)
    out = run(f"import sys; import lightning_geomdim; {imports}; "
              "print(sorted(m for m in ('lightning', 'torchmetrics', 'torchvision') if m in sys.modules))")
    assert out == "[]"


def test_lightning_layer_is_imported_on_first_use() -> None:
    out = run("import sys, lightning_geomdim as g; cls = g.GeometryMonitor; "
              "print(cls.__module__, 'lightning' in sys.modules)")
    assert out == "lightning_geomdim.callback.monitor True"
