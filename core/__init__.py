"""The floor: typed config, tokenizer, data and token shards, models, checkpoints, run directories,
metric sinks, processes."""

# This folder is the package ``weightgeom.core`` through the link weightgeom/core -> ../core, which
# pyproject.toml's packages.find (include weightgeom*) installs; imported by its bare folder name
# (``import core`` from the repository root) it would be a second copy of every module.
if __name__ != "weightgeom.core":
    raise ImportError(f"import weightgeom.core, not {__name__}: this folder is the package weightgeom.core "
                      "(pip install -e . from the repository root)")
