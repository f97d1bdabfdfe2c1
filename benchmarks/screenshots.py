"""Refresh the README's screenshots (asset graph, fitted_params, its stage curves).

    python benchmarks/screenshots.py

Runs the browser test (Debian's Chromium driven by Playwright: `dagster dev` on the bundled
sample, "Materialize all" clicked in the UI, fitted_params opened) and has it copy its
screenshots into `benchmarks/screenshots/`. About two minutes on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "screenshots"


def main() -> int:
    env = {**os.environ, "E6SCORE_SCREENSHOT_DIR": str(OUT)}
    test = "e6score_dagster_tests/test_browser.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", test]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
