"""The application: the CLI, the recipe pipeline, reports, compare and the rank-1 causal test."""

# This folder is the package ``weightgeom.harness`` through the link weightgeom/harness -> ../harness, which
# pyproject.toml's packages.find (include weightgeom*) installs; imported by its bare folder name
# (``import harness`` from the repository root) it would be a second copy of every module.
if __name__ != "weightgeom.harness":
    raise ImportError(f"import weightgeom.harness, not {__name__}: this folder is the package weightgeom.harness "
                      "(pip install -e . from the repository root)")
