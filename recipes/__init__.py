"""The bundled YAML recipes (package data, read with ``importlib.resources``)."""

from importlib.resources import files
from pathlib import Path

# This folder is the package ``weightgeom.recipes`` through the link weightgeom/recipes -> ../recipes, which
# pyproject.toml's packages.find (include weightgeom*) installs; imported by its bare folder name
# (``import recipes`` from the repository root) it would be a second copy of every module.
if __name__ != "weightgeom.recipes":
    raise ImportError(f"import weightgeom.recipes, not {__name__}: this folder is the package weightgeom.recipes "
                      "(pip install -e . from the repository root)")


def bundled() -> dict[str, Path]:
    """``{name: path}`` of every bundled recipe (``asymmetry`` -> .../weightgeom/recipes/asymmetry.yaml)."""
    root = Path(str(files(__name__)))  # an installed package is a directory (wheels are unpacked, never zipped)
    return {path.stem: path for path in sorted(root.glob("*.yaml"))}
