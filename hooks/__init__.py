"""The instruments and their math: role table, covariance and update instruments, geometry, metric
quantities and key names. Plain torch: never imports transformers, TRL, accelerate, PEFT or datasets."""

# This folder is the package ``weightgeom.hooks`` through the link weightgeom/hooks -> ../hooks, which
# pyproject.toml's packages.find (include weightgeom*) installs; imported by its bare folder name
# (``import hooks`` from the repository root) it would be a second copy of every module.
if __name__ != "weightgeom.hooks":
    raise ImportError(f"import weightgeom.hooks, not {__name__}: this folder is the package weightgeom.hooks "
                      "(pip install -e . from the repository root)")
