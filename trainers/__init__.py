"""The training loops (CE pretraining, the preference loop, TRL) on one shared session, the losses,
and the HF ``TrainerCallback``."""

# This folder is the package ``weightgeom.trainers`` through the link weightgeom/trainers -> ../trainers, which
# pyproject.toml's packages.find (include weightgeom*) installs; imported by its bare folder name
# (``import trainers`` from the repository root) it would be a second copy of every module.
if __name__ != "weightgeom.trainers":
    raise ImportError(f"import weightgeom.trainers, not {__name__}: this folder is the package weightgeom.trainers "
                      "(pip install -e . from the repository root)")
