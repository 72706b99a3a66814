#!/usr/bin/env bash
# Install the LOWEST versions that pyproject.toml admits into a fresh venv and run a fast test subset:
# do the lower bounds hold? Not part of CI (it downloads a few hundred MB). From the repository root:
#
#   bash benchmarks/check_min_versions.sh              # venv in /tmp/venv-min, then the tests
#   bash benchmarks/check_min_versions.sh --keep-torch # torch from constraints.txt (the local CPU wheel)
#   VENV=/path PYTHON=python3.11 bash benchmarks/check_min_versions.sh
#
# pip has no "lowest versions" resolver, and pinning every `name>=X` to `name==X` at once is not
# installable when one bound implies another (transformers 4.57 needs tokenizers >= 0.22), so the
# venv is resolved by uv (installed into it from PyPI) with `--resolution lowest-direct`: every direct
# dependency at the lowest version compatible with the others. `pip list` is printed so the versions
# that ran are on record. `--keep-torch` pins torch to constraints.txt instead of its lower bound:
# PyPI's torch wheels for Linux are CUDA builds (gigabytes), so on a CPU machine without a CPU wheel
# of the lowest torch at hand this is the practical way to check everything else.
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP_TORCH=0
for arg in "$@"; do
    case "$arg" in
        --keep-torch) KEEP_TORCH=1 ;;
        -h|--help) sed -n 2,15p "$0"; exit 0 ;;
        *) echo "check_min_versions.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
VENV="${VENV:-/tmp/venv-min}"
CONSTRAINTS=()

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q uv
# find-links: a local torch CPU wheel where the machine has one (pip's config names it; uv reads flags only)
LINKS=()
for dir in ${PIP_FIND_LINKS:-} $("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true); do
    [[ -d "$dir" ]] && LINKS+=(--find-links "$dir")
done
if [[ $KEEP_TORCH -eq 1 ]]; then
    # constraints.txt's torch, as the local CPU wheel when one is there (torch==X alone lets uv take
    # PyPI's CUDA build of X: gigabytes of nvidia packages)
    pin="$(grep -E '^torch==' constraints.txt)"
    for dir in "${LINKS[@]}"; do
        [[ "$dir" == --find-links ]] && continue
        [[ $pin != *+cpu ]] && compgen -G "$dir/torch-${pin#torch==}+cpu-*.whl" >/dev/null && pin="$pin+cpu"
    done
    echo "$pin" >"$VENV/torch-pin.txt"
    CONSTRAINTS=(-c "$VENV/torch-pin.txt")
    echo "torch kept at $pin"
fi
"$VENV/bin/python" -m uv pip install --python "$VENV/bin/python" --resolution lowest-direct "${CONSTRAINTS[@]}" \
    "${LINKS[@]}" -e ".[test]"
echo "installed:"
"$VENV/bin/python" -m uv pip list --python "$VENV/bin/python" 2>/dev/null | grep -iE "^(torch|transformers|trl|peft|accelerate|datasets|tokenizers|safetensors|numpy|pyyaml|tensorboard|matplotlib|tqdm|pytest|import-linter) "

# The fast subset: instruments against brute force, config, keys, geometry, layering, one TRL run.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow and not gpu" \
    tests/hooks/test_covariance.py tests/hooks/test_updates.py tests/hooks/test_gram.py tests/hooks/test_suite.py tests/hooks/test_geometry.py \
    tests/hooks/test_keys.py tests/core/test_config.py tests/test_architecture.py tests/trainers/test_trl_dpo.py tests/trainers/test_losses.py
