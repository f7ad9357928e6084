"""``pip install .`` installs only the ``spotlighter`` package (never a top-level ``datasets`` or
``trainers`` that would shadow HuggingFace ``datasets``), with its data files."""

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_has_only_the_spotlighter_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), ROOT], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("spotlighter-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"spotlighter"}
    assert "spotlighter/data/base2new_published.csv" in names
    assert "spotlighter/results/cli.py" in names and "spotlighter/benchmark/data.py" in names
