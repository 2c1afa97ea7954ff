"""The package's shape: one installed top-level package, imports that flow one way, a torch-free schema."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Layers, lowest first: a module may import its own layer and the layers below, never those above.
LAYERS = [
    {"gazelit.schema", "gazelit.shapes", "gazelit.integrity", "gazelit.tokenizer", "gazelit.drawing"},
    {"gazelit.attention", "gazelit.batch"},
    {"gazelit.models"},
    {"gazelit.datamodules", "gazelit.callbacks"},
    {"gazelit.lit_module", "gazelit.optim", "gazelit.training", "gazelit.recipe"},
    {"gazelit.eval", "gazelit.viewer", "gazelit.analysis"},
    {"gazelit.cli"},
]
FOLDERS = {"gazelit": "gazelit", "datamodules": "gazelit.datamodules", "callbacks": "gazelit.callbacks"}


def layer_of(module: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in layer):
            return index
    return None


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def test_imports_flow_one_way():
    wrong = []
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            module = ".".join([package, *[p for p in parts if p != "__init__"]])
            own = layer_of(module)
            for target in imports(path):
                assert not target.startswith(("datamodules", "callbacks")), f"{path}: imports top-level {target}"
                theirs = layer_of(target)
                if own is not None and theirs is not None and theirs > own:
                    wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def test_schema_and_validate_import_neither_torch_nor_lightning():
    code = (
        "import sys\n"
        "from gazelit.cli import main\n"
        f"rc = main(['validate', '--quiet', '--offline', {str(REPO / 'recipes' / 'cambrian7b_finetune.yaml')!r}])\n"
        "heavy = [m for m in ('torch', 'lightning', 'transformers', 'torchmetrics') if m in sys.modules]\n"
        "print('RESULT', rc, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "RESULT 0 []" in out.stdout, out.stdout + out.stderr


@pytest.mark.filterwarnings("ignore")
def test_the_wheel_installs_one_top_level_package(tmp_path):
    import shutil

    source = tmp_path / "src"  # a copy: building in place would leave build/ in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "gazelit", "datamodules", "callbacks"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("gazelit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"gazelit", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "gazelit/datamodules/stream.py" in names and "gazelit/callbacks/checkpointing.py" in names


def test_vision_default_sizes_are_transformers_defaults():
    from transformers import CLIPVisionConfig, Dinov2Config, Dinov2WithRegistersConfig, SiglipVisionConfig

    from gazelit.shapes import VISION_DEFAULT_SIZES

    for family, cls in [("clip", CLIPVisionConfig), ("dinov2", Dinov2Config), ("dinov2_with_registers", Dinov2WithRegistersConfig),
                        ("siglip", SiglipVisionConfig), ("siglip2", SiglipVisionConfig)]:  # fmt: skip
        config = cls()
        assert VISION_DEFAULT_SIZES[family] == (config.image_size, config.patch_size), family
