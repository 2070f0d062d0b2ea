"""The layers are a contract checked by import-linter (pyproject ``[tool.importlinter]``): the shared
kernels, the serving side and the client never import the pipeline or torch."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("export", "kernels", "client", "model_repository")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(tree / "pyproject.toml")],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": ""}, capture_output=True, text=True,
                          timeout=300)


def test_every_layer_contract_is_kept():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "5 kept, 0 broken" in done.stdout


def test_a_client_that_imports_the_pipeline_breaks_the_contract(tmp_path):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path)
    predict = tmp_path / "client" / "predict.py"
    predict.write_text(predict.read_text() + "\nfrom export.data.datasets import load_dataset  # a leak\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "the client speaks gRPC: no pipeline, no torch, no detector math BROKEN" in done.stdout
    assert "client.predict -> export.data.datasets" in done.stdout
