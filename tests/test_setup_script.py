"""scripts/setup.sh ends by saying where the tools are and how to call them (they are not on PATH until the
environment is activated). Run on its no-op path: an environment already set up for this checkout."""

import hashlib
import os
import subprocess
import sys

from conftest import REPO


def test_setup_ends_by_saying_how_to_call_the_tools(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"  # this interpreter, which imports vkd_dist: the set-up is current
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    extras = "dev,bench,fast,pretrained"
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "constraints.txt").read_bytes())
    (venv / ".vkd-setup-stamp").write_text(f"{digest.hexdigest()}-{extras}\n")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VKD_VENV": str(venv), "VKD_EXTRAS": extras})
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-3:]
    assert last[0].startswith("The tools (vkd-train,") and last[0].endswith(f"are in {venv}/bin:")
    assert last[1].split()[:2] == ["source", f"{venv}/bin/activate"]
    assert f"{venv}/bin/vkd-export runs/default --out model" in last[2]
