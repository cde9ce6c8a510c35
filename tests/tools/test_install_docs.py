"""The README's set-up: the command CI runs is the README's, and its CPU-index line gets the CPU build of torch."""

import base64
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _bash_lines(text: str):
    """Every command line of the README's bash blocks (comments left out)."""
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        yield from (line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#"))


def test_ci_sets_up_and_tests_exactly_as_the_readme_s_second_command():
    command = next(line for line in _bash_lines(README) if line.endswith("python -m pytest -q"))
    set_up = command[: -len(" && python -m pytest -q")]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert set_up in ci and "python -m pytest -q" in ci


def _wheel(index: Path, version: str) -> None:
    """A minimal ``torch`` wheel of ``version`` in a PEP 503 simple index at ``index``."""
    name, info = f"torch-{version}-py3-none-any.whl", f"torch-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(data)}\n"
        for path, data in files.items()
    )
    (index / "torch").mkdir(parents=True)
    with zipfile.ZipFile(index / "torch" / name, "w") as wheel:
        for path, data in {**files, f"{info}/RECORD": record + f"{info}/RECORD,,\n"}.items():
            wheel.writestr(path, data)
    (index / "torch" / "index.html").write_text(f'<a href="{name}">{name}</a>\n')


def test_the_readme_s_one_command_install_takes_torch_s_cpu_build_over_the_public_one(tmp_path):
    """pip given the public index and PyTorch's CPU index picks ``2.13.0+cpu`` for ``torch==2.13.0``. Checked with
    this environment's pip against two local indexes standing in for them (the real ones are not reachable from
    tests), each holding its build of torch."""
    one_command = next(line for line in _bash_lines(README) if "--extra-index-url" in line)
    assert one_command == f'pip install --extra-index-url {CPU_INDEX} torch==2.13.0 ".[models]"'
    assert f"pip install torch==2.13.0 --index-url {CPU_INDEX}" in list(_bash_lines(README))
    public, cpu = tmp_path / "public", tmp_path / "cpu"
    _wheel(public, "2.13.0")
    _wheel(cpu, "2.13.0+cpu")
    report = tmp_path / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--no-deps"]
    pip += ["--report", str(report), "--index-url", public.as_uri(), "--extra-index-url", cpu.as_uri(), "torch==2.13.0"]
    subprocess.run(pip, check=True, capture_output=True, timeout=120)
    chosen = [item["metadata"]["version"] for item in json.loads(report.read_text())["install"]]
    assert chosen == ["2.13.0+cpu"]
    # Without the CPU index, the same request takes the public build: the README's warning about PyPI.
    subprocess.run(pip[:-3] + ["torch==2.13.0"], check=True, capture_output=True, timeout=120)
    assert [item["metadata"]["version"] for item in json.loads(report.read_text())["install"]] == ["2.13.0"]
