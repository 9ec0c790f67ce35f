"""The package's layers, as the tree shows them: each package imports only from itself and the layers below it,
and the model layer loads without Ray (a timm user who builds a GLiT pays for neither Ray nor its data stack)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "glit_ray"
# what each layer may import from glit_ray; the top level (the commands and `runs`) may import anything
BELOW = {
    "core": set(),
    "models": {"core"},
    "cluster": {"core"},
    "training": {"core", "models", "cluster"},
    "searching": {"core", "models", "cluster", "training"},
}


def imported(path: Path, package: Path = PACKAGE) -> set[str]:
    """The glit_ray modules a file of `package` imports, as dotted names under glit_ray (relative imports
    resolved)."""
    package = path.relative_to(package.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "glit_ray"}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            if module.split(".")[0] == "glit_ray":
                names |= {f"{module}.{alias.name}" for alias in node.names}
    return {name.removeprefix("glit_ray.") for name in names if name != "glit_ray"}


def layer(module: str) -> str:
    """The layer a module under glit_ray belongs to: its package, or "top" for the commands."""
    first = module.split(".")[0]
    return first if first in BELOW else "top"


def test_every_package_imports_only_from_itself_and_the_layers_below():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = layer(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        if here == "top":
            continue
        for module in imported(path):
            if layer(module) not in BELOW[here] | {here}:
                wrong.append(f"{path.relative_to(PACKAGE)} ({here}) imports glit_ray.{module} ({layer(module)})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_imports_upwards_relative_or_absolute(tmp_path):
    probe = tmp_path / "glit_ray" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..searching.results import SCHEMA\nimport glit_ray.training.loop\n"
                     "from glit_ray.cluster import storage\nfrom .arch import Architecture\n")
    found = imported(probe, tmp_path / "glit_ray")
    assert found == {"searching.results.SCHEMA", "training.loop", "cluster.storage", "models.arch.Architecture"}
    assert {layer(m) for m in found} - BELOW["models"] - {"models"} == {"searching", "training", "cluster"}


@pytest.mark.subprocess
def test_the_model_layer_the_base_and_the_deployment_commands_load_without_ray():
    """What a deployment device runs (the export, the latency table) needs no Ray: it may have none."""
    modules = sorted(f"glit_ray.{p.parent.name}.{p.stem}" for pkg in ("core", "models")
                     for p in (PACKAGE / pkg).glob("*.py") if p.stem != "__init__")
    modules += ["glit_ray.export", "glit_ray.latency_table"]
    code = (f"import sys; import {', '.join(modules)}\n"
            "print(sorted({name.split('.')[0] for name in sys.modules} & {'ray', 'pyarrow', 'pandas'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert len(modules) >= 12 and out.split() == ["[]"]
