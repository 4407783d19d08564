#!/usr/bin/env bash
# GPU benchmark check for issue 3 (tower throughput / MFU), the SAT coco train step and the
# Flamingo ~1B step (issue 9).
#
# Run from the repository root on an H100/H200 machine (jax CUDA, flax, torch, transformers
# installed; nothing is installed from the network):
#
#     bash benchmarks/gpu_check.sh            # ~7-9 min; logs under $OUT (default ./gpu_check_out)
#
# Through this workplace's device tool: run(command="bash benchmarks/gpu_check.sh",
# timeout_s=600, carry=[".whl"]). The SAT train-step benchmark imports configs through
# ml_collections, which the GPU image lacks: carry it as a wheel. Once, here, in the repo root:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         -d .whl ml_collections==1.1.0
# (ml_collections is pure Python; its needs absl-py and PyYAML are in the GPU image.) The
# tower benchmarks need no ml_collections, tfds or grain; without .whl/ only the train-step
# line fails, and says so in the table.
#
# What it runs (each a separate process with its own timeout; one failure does not stop the
# rest), in this order:
#   1-2. CLIP ViT-L/14 (224 px, 257 tokens), batch 128, bf16: --attention cudnn, then xla (the
#        project's XLA path: einsum + softmax with saved-probabilities VJP, vlm_jax/layers/attention.py)
#   3-4. OPT-1.3B-shaped decoder LM (random weights), batch 16 x 512 tokens, bf16: cudnn, xla
#   5.   python benchmarks/train_throughput.py --config configs/sat.py:coco --vocab_size 10000
#   6.   python benchmarks/flamingo_step.py --preset gpu1b (beside HF IDEFICS on the same weights)
#   7.   python benchmarks/blip2_step.py --preset vitl (BLIP-2 stage 1, ViT-L/14 + Q-Former-base, batch 128,
#        bf16) beside ../shared/bench/hf_blip2_stage1.py vitl 128 in the same call. ../shared does not
#        travel to the GPU machine: copy the script into the git-ignored .bench_ref/ and carry it,
#            mkdir -p .bench_ref && cp ../shared/bench/hf_blip2_stage1.py .bench_ref/
#            run(command="bash benchmarks/gpu_check.sh", timeout_s=600, carry=[".whl", ".bench_ref"])
# SECTIONS="towers train flamingo blip2" (the default: all) picks sections, e.g. SECTIONS=blip2 for a
# rerun of one; the whole script is ~9-10 min on an H200, so a rerun should name what it needs.
# Optional: COMPARE_TORCH=1 adds the transformers/PyTorch model beside each tower run
# (same shapes, bf16 autocast, eager, sdpa attention; built directly on the GPU; adds ~1 min).
# MFU denominators: 683 TFLOP/s on H100, 652 on H200 (this project's measured bf16 matmul
# ceilings; benchmarks/towers_throughput.py picks them from the device name).
#
# Outputs under $OUT: towers.jsonl (one JSON line per tower run), towers.log (all tower
# stdout/stderr), train.log, env.txt, summary.txt (the table printed last).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
T0=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL=2
unset JAX_PLATFORMS

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__); print(jax.devices())" 2>&1
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1
  python3 -c "import ml_collections; print('ml_collections', ml_collections.__file__)" 2>&1 | tail -1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

TORCH_FLAG=""
[ "${COMPARE_TORCH:-0}" = "1" ] && TORCH_FLAG="--compare-torch"

tower() {   # tower TIMEOUT_S ARGS...  -> one JSON line appended to towers.jsonl
  local limit=$1; shift
  echo "=== towers_throughput.py $* ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/towers.log"
  timeout "$limit" python3 benchmarks/towers_throughput.py "$@" $TORCH_FLAG --json-out "$OUT/towers.jsonl" \
    >> "$OUT/towers.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "    exit code $rc" | tee -a "$OUT/towers.log"
    # the script writes its JSON line itself, even on error; a timeout or crash leaves none
    if [ $rc -eq 124 ] || [ $rc -ge 128 ]; then
      python3 -c "import json,sys; print(json.dumps(dict(args=sys.argv[1:], error='exit code $rc (timeout or crash) after $limit s limit')))" \
        "$@" >> "$OUT/towers.jsonl"
    fi
  fi
  tail -n 1 "$OUT/towers.jsonl"
}

# Shapes can be overridden (e.g. a dry run on a CPU: VIT_ARGS="--tower vit --tiny --dtype bfloat16").
VIT="${VIT_ARGS:---tower vit --preset clip_vit_l14 --batch 128 --dtype bfloat16 --steps 10 --warmup 2}"
LM="${LM_ARGS:---tower lm --preset opt-1.3b --batch 16 --seq 512 --dtype bfloat16 --steps 10 --warmup 2}"
TRAIN="${TRAIN_ARGS:---config configs/sat.py:coco --vocab_size 10000}"
SECTIONS="${SECTIONS:-towers train flamingo blip2}"
want() { case " $SECTIONS " in *" $1 "*) return 0;; *) return 1;; esac; }
if want towers; then
tower 150 $VIT --attention cudnn
tower 150 $VIT --attention xla
tower 150 $LM --attention cudnn
tower 150 $LM --attention xla
fi

if want train; then
echo "=== train_throughput.py $TRAIN ($(( $(date +%s) - T0 )) s)"
timeout 150 python3 benchmarks/train_throughput.py $TRAIN > "$OUT/train.log" 2>&1
echo "    exit code $?"
tail -n 3 "$OUT/train.log"
fi

# 6. Flamingo (issue 9): ~1B frozen LLaMA-shaped LM (16 layers, width 2048) + frozen CLIP ViT-L/14,
#    resampler 6 x 1024, gated cross-attention every 4th layer, batch 8 x 2 images x 512 tokens, bf16,
#    beside HF IdeficsForVisionText2Text on the same weights (goal: >= 50% MFU of the card's ceiling).
#    Imports vlm_jax.optim -> config_lib -> ml_collections: needs the .whl/ carried as above.
FLAMINGO="${FLAMINGO_ARGS:---preset gpu1b --steps 10 --warmup 2}"
if want flamingo; then
echo "=== flamingo_step.py $FLAMINGO ($(( $(date +%s) - T0 )) s)"
FLAMINGO_STEP_JSON="$OUT/flamingo.jsonl" timeout 200 python3 benchmarks/flamingo_step.py $FLAMINGO > "$OUT/flamingo.log" 2>&1
echo "    exit code $?"
tail -n 6 "$OUT/flamingo.log"
fi

# 7. BLIP-2 stage 1 (issue 8): frozen ViT-L/14 + Q-Former-base (32 queries), batch 128, bf16, ITC + ITM
#    (and + ITG) beside transformers' Blip2 modules (goals: >= 60% of the card's bf16 ceiling, >= 1.5x
#    the peer's images/s). The peer script is read from .bench_ref/ (carried) or ../shared/bench/.
PEER=.bench_ref/hf_blip2_stage1.py
[ -f "$PEER" ] || PEER=../shared/bench/hf_blip2_stage1.py
BLIP2="${BLIP2_ARGS:---preset vitl --steps 10 --warmup 2}"
if want blip2; then
echo "=== blip2_step.py $BLIP2 --peer $PEER ($(( $(date +%s) - T0 )) s)"
BLIP2_STEP_JSON="$OUT/blip2.jsonl" timeout 240 python3 benchmarks/blip2_step.py $BLIP2 --peer "$PEER" \
  > "$OUT/blip2.log" 2>&1
echo "    exit code $?"
tail -n 8 "$OUT/blip2.log"
fi


python3 - "$OUT" "$TRAIN" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]

def read_jsonl(name):
    path = os.path.join(out, name)
    rows = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def no_result(script, log):
    path = os.path.join(out, log)
    tail = open(path).readlines()[-5:] if os.path.exists(path) else []
    print(f"\n{script}: no result; last lines of {log}:\n" + "".join(tail))


rows = read_jsonl("towers.jsonl")
print(f"\n{'tower':5} {'preset':13} {'B':>4} {'N':>5} {'attn':6} {'step ms':>9} {'ex/s':>9} "
      f"{'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6}  {'torch ms':>8} {'ratio':>6}  note")
for r in rows:
    if "error" in r:
        print(f"{r.get('tower', '?'):5} {r.get('preset', '?'):13} {str(r.get('batch', '')):>4} {'':>5} "
              f"{r.get('attention', ''):6} {'':6} ERROR {r['error'][:150]} {r.get('args', '')}")
        continue
    t = r.get("torch") or {}
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    print(f"{r['tower']:5} {r['preset']:13} {r['batch']:>4} {r['seq']:>5} {r['attention']:6} "
          f"{r['step_ms']:>9.2f} {r['examples_per_s']:>9.1f} {r['tokens_per_s']:>10.0f} "
          f"{r['tflops']:>8.1f} {mfu:>6}  {t.get('step_ms', '-'):>8} {r.get('ratio', '-'):>6}  "
          f"peak {r['peak_tflops']} on {r['device']}")
train = [json.loads(l) for l in (open(os.path.join(out, "train.log")) if os.path.exists(os.path.join(out, "train.log")) else [])
         if l.startswith("{")]
if train:
    t = train[-1]
    print(f"\ntrain_throughput.py {sys.argv[2]}: {t['step_ms']} ms, {t['examples_per_sec']} ex/s, {t['tokens_per_sec']} tok/s, "
          f"batch {t['batch']}, {t['dtype']}, {t['devices']}, {t.get('model_tflops')} TFLOP/s (dot/conv), "
          f"MFU {t.get('mfu')}")
else:
    no_result(f"train_throughput.py {sys.argv[2]}", "train.log")
fl = read_jsonl("flamingo.jsonl")
if fl:
    f = fl[-1]
    mfu = f"{100 * f['mfu']:.1f}%" if f.get("mfu") is not None else "-"
    print(f"\nflamingo_step.py {f['preset']}: vlm_jax {f['ms'].get('vlm_jax (JAX, jit)', 0):.1f} ms, "
          f"IDEFICS {f['ms'].get('HF IDEFICS (torch)', float('nan')):.1f} ms, ratio {f.get('ratio', '-')}, "
          f"{f['tflops']:.1f} TFLOP/s, MFU {mfu} (peak {f.get('peak_tflops')}) on {f['hardware']}")
else:
    no_result("flamingo_step.py", "flamingo.log")
bl = read_jsonl("blip2.jsonl")
if bl:
    b = bl[-1]
    for r in b["ours"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        sp = f"{r['speedup_vs_peer']:.2f}x" if r.get("speedup_vs_peer") else "-"
        peer = f"{b['peer_ms']:.1f} ms" if b.get("peer_ms") else "-"
        print(f"blip2_step.py {b['preset']} B={b['batch']} {r['objectives']}: vlm_jax {r['ms']:.1f} ms "
              f"({r['img_per_s']:.0f} img/s), peer {peer}, speedup {sp}, "
              f"{r['tflops']:.1f} TFLOP/s, MFU {mfu} (peak {b['peak_tflops']}) on {b['hardware']}")
else:
    no_result("blip2_step.py", "blip2.log")
EOF
echo "total $(( $(date +%s) - T0 )) s"
