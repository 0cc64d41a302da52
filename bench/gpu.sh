#!/usr/bin/env bash
# kdlab vs TRL on one NVIDIA GPU (issue 23): bench/vs_trl.py for the 124m and qwen-0.5b-1.5b presets with
# --device cuda --precision bf16, configurations off_fkl_cached, on_jsd, on_jsd_vllm, off_fkl_live.
#
#   bash bench/gpu.sh [OUT_DIR]            # default OUT_DIR: bench/gpu-results
#   bash bench/gpu.sh --smoke [OUT_DIR]    # the same commands on the CPU: --smoke --device cpu --precision fp32, no vLLM
#
# Non-interactive. Writes OUT_DIR/env.txt (nvidia-smi, versions), OUT_DIR/<preset>.json (bench/vs_trl.py --json,
# rewritten after every row, so a preset cut by its time limit keeps its finished rows) and OUT_DIR/<preset>.log.
# Each preset runs under `timeout`: LIMIT_124M (default 170 s) and LIMIT_QWEN (default 290 s), 7.7 minutes at most
# in all; on_jsd_vllm comes right after on_jsd (TRL's column of that row is its on_jsd run: GKDTrainer has no vLLM
# path) and off_fkl_live last, the row a cut loses first. These limits are estimates: the script has not been run
# on a GPU yet.
# Environment: PY (default .venv/bin/python, else python3). INSTALL_VLLM=1 tries `pip install 'vllm>=0.11'` when
# vLLM is missing (off by default: vLLM pins its own torch build and may replace the one installed; pyproject.toml);
# without vLLM the on_jsd_vllm rows are skipped with a message. Models and runs go to a temporary directory
# (about 20 GB for the Qwen preset), removed at the end.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT=${1:-bench/gpu-results}
LIMIT_124M=${LIMIT_124M:-170}
LIMIT_QWEN=${LIMIT_QWEN:-290}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's kdlab, whatever the venv points at
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kdlab-gpu-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say() { echo "[gpu.sh] $*"; }

# (a) what the benchmark needs, installed into $PY's environment when missing
if ! "$PY" -c "import torch, transformers, trl, datasets, kdlab" 2>/dev/null; then
    say "installing kdlab with its bench extra (trl) into $PY's environment"
    "$PY" -m pip install -q -e '.[bench]' || { say "pip install -e '.[bench]' failed: cannot run"; exit 1; }
fi
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import vllm" 2>/dev/null; then
    if [ "${INSTALL_VLLM:-0}" = 1 ]; then
        say "vLLM missing: trying pip install 'vllm>=0.11' (may replace torch)"
        if timeout 900 "$PY" -m pip install -q --retries 1 --timeout 20 'vllm>=0.11'; then
            say "vLLM installed"
        else
            say "pip install vllm FAILED (tolerated): the on_jsd_vllm rows will be skipped"
        fi
    else
        say "vLLM is not installed: the on_jsd_vllm rows will be skipped (INSTALL_VLLM=1 to try pip install)"
    fi
fi

# (b) the machine and the versions
{
    date -u +"%Y-%m-%d %H:%M:%S UTC"
    if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "nvidia-smi: not available"; fi
    "$PY" - <<'EOF'
import platform, torch, transformers, trl
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, trl {trl.__version__}")
try:
    import vllm
    print(f"vllm {vllm.__version__}")
except ImportError:
    print("vllm: not installed")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
else:
    print("GPU: torch sees none")
print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads by default")
EOF
    echo "kdlab commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} 2>&1 | tee "$OUT/env.txt"

if [ "$SMOKE" = 1 ]; then
    FLAGS=(--smoke --device cpu --precision fp32)
    CONFIGS=off_fkl_cached,on_jsd,off_fkl_live
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { say "torch sees no CUDA device: nothing to run (bash bench/gpu.sh --smoke runs the CPU form)"; exit 1; }
    FLAGS=(--device cuda --precision bf16)
    CONFIGS=off_fkl_cached,on_jsd,on_jsd_vllm,off_fkl_live
fi

# (c) the presets, each under its time limit
status=0
for spec in "124m $LIMIT_124M" "qwen-0.5b-1.5b $LIMIT_QWEN"; do
    set -- $spec
    preset=$1 limit=$2
    say "$preset: ${FLAGS[*]} --configs $CONFIGS (limit ${limit} s)"
    start=$(date +%s)
    timeout -k 20 "$limit" "$PY" bench/vs_trl.py --preset "$preset" "${FLAGS[@]}" --configs "$CONFIGS" \
        --root "$WORK/$preset" --json "$OUT/$preset.json" 2>&1 | tee "$OUT/$preset.log"
    rc=${PIPESTATUS[0]}
    took=$(( $(date +%s) - start ))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        say "$preset: TIMED OUT after ${took} s (limit ${limit} s); finished rows are in $OUT/$preset.json"
        status=1
    elif [ "$rc" != 0 ]; then
        say "$preset: exit status $rc after ${took} s (see $OUT/$preset.log)"
        status=1
    else
        say "$preset: done in ${took} s"
    fi
    rm -rf "$WORK/$preset"
done

# a summary of what came back
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    d = json.loads(path.read_text())
    m = d["meta"]
    print(f"{path.name}: {m['workload']['name']} on {m['device']} {m['precision']}, params teacher "
          f"{m['params']['teacher']:,} student {m['params']['student']:,}; FLOP reference {m['flop_reference']['source']}")
    for r in d["results"]:
        print(f"  {r['config']:16} kdlab {r['kdlab_median_s'] * 1e3:8.1f} ms  TRL {r['trl_median_s'] * 1e3:8.1f} ms  "
              f"TRL/kdlab {r['speedup']:5.2f}x  kdlab {r['kdlab_fraction_of_limit']:6.1%}  TRL {r['trl_fraction_of_limit']:6.1%}")
    for s in d["skipped"]:
        print(f"  {s['config']:16} skipped: {s['reason']}")
    for f in d["failures"]:
        print(f"  {f['config']:16} FAILED (see the log)")
EOF
exit $status
