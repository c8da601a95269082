#!/usr/bin/env bash
# One GPU check: every GPU figure the project still lacks, on one H100/H200, in under 8 minutes.
#
#   bash bench/gpu_check.sh [--out DIR] [--device cuda|cpu] [--tiny]
#
# Parts (each its own process and timeout, so one failure loses nothing else; each writes
# DIR/<part>.json, and DIR/summary.json gathers the headline figures):
#   prior            ~1B prior (paper sequence 1280): tokens/s, MFU, peak memory, fp16 with
#                    per-resblock scaling and bf16 (bench/prior.py --profile gpu-1B)
#   prior_attention  SDPA vs FlexAttention (bench/prior.py --attention sdpa flex), only when
#                    bench/prior.py --help lists --attention; else a note says it was skipped
#   dvae             the paper dVAE's train step and encode rate in bf16, peak memory (bench/dvae.py)
#   sample           cached sampling at 32x32 vs uncached, 16 draws a caption sharing its
#                    caption block vs each its own (bench/sample.py)
#   inception        Inception feature rate, random weights unless $DALLE_INCEPTION_WEIGHTS
#                    (bench/inception.py)
# Every <part>.json: {"part", "ok", "rc", "timed_out", "skipped", "wall_s", "timeout_s",
# "command", "result" (the bench's own JSON), "error" (stderr tail on failure)}.
#
# --device cpu --tiny: a dry run of every part with tiny shapes on the CPU (tests/test_gpu_check.py).
# Timeouts (seconds) can be changed with GPU_CHECK_TIMEOUT_<PART> (e.g. GPU_CHECK_TIMEOUT_PRIOR=200);
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="gpu_check_out"
DEVICE="cuda"
TINY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        --device) DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#--device=}"; shift ;;
        --tiny) TINY=1; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

# timeouts: the sum stays under 8 minutes (480 s) on a GPU
if [ "$TINY" = 1 ]; then d_prior=60; d_attn=60; d_dvae=60; d_sample=60; d_inception=60
else d_prior=150; d_attn=110; d_dvae=90; d_sample=60; d_inception=50; fi
T_PRIOR=${GPU_CHECK_TIMEOUT_PRIOR:-$d_prior}
T_ATTN=${GPU_CHECK_TIMEOUT_PRIOR_ATTENTION:-$d_attn}
T_DVAE=${GPU_CHECK_TIMEOUT_DVAE:-$d_dvae}
T_SAMPLE=${GPU_CHECK_TIMEOUT_SAMPLE:-$d_sample}
T_INCEPTION=${GPU_CHECK_TIMEOUT_INCEPTION:-$d_inception}

# record one part: <part>.json from the command's stdout (its JSON), exit code and stderr
record() {  # name rc wall timeout skipped note command...
    local name="$1" rc="$2" wall="$3" limit="$4" skipped="$5" note="$6"; shift 6
    "$PYTHON" - "$OUT" "$name" "$rc" "$wall" "$limit" "$skipped" "$note" "$@" <<'PY'
import json, sys
from pathlib import Path
out, name, rc, wall, limit, skipped, note, *cmd = sys.argv[1:]
out, rc = Path(out), int(rc)
stdout = (out / f"{name}.stdout").read_text() if (out / f"{name}.stdout").exists() else ""
stderr = (out / f"{name}.log").read_text(errors="replace") if (out / f"{name}.log").exists() else ""
result, parse_error = None, None
if stdout.strip():
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError:  # a bench that printed more than its JSON: take the last JSON line
        for line in reversed(stdout.strip().splitlines()):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
        if result is None:
            parse_error = "stdout is not JSON"
ok = skipped != "1" and rc == 0 and result is not None
rec = {"part": name, "ok": ok, "rc": rc, "timed_out": rc in (124, 137), "skipped": skipped == "1",
       "wall_s": round(float(wall), 2), "timeout_s": int(limit), "command": " ".join(cmd), "result": result,
       "error": None if ok or skipped == "1" else (parse_error or stderr[-3000:] or f"exit code {rc}")}
if note:
    rec["note"] = note
(out / f"{name}.json").write_text(json.dumps(rec, indent=1))
print(f"gpu_check: {name}: {'skipped' if rec['skipped'] else 'ok' if ok else 'FAILED'} "
      f"(rc {rc}, {rec['wall_s']} s)", file=sys.stderr)
PY
}

run_part() {  # name timeout command...
    local name="$1" limit="$2"; shift 2
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.stdout" 2> "$OUT/$name.log"
    rc=$?
    t1=$(date +%s.%N)
    record "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "$limit" 0 "" "$@"
}

skip_part() {  # name note
    : > "$OUT/$1.stdout"; : > "$OUT/$1.log"
    record "$1" 0 0 0 1 "$2" ""
}

if [ "$TINY" = 1 ]; then
    PRIOR_ARGS=(--profile tiny --device "$DEVICE" --batch 2 --steps 3)
    PRECISIONS=(fp16-per-resblock bf16)
    DVAE_ARGS=(--profile tiny --device "$DEVICE" --batch 2 --repeats 1 --dtype bf16)
    SAMPLE_ARGS=(--device "$DEVICE" --grids 8 --rows 2 --uncached-rows 1 --draws 2)
    INCEPTION_ARGS=(--device "$DEVICE" --images 2 --batch-size 2 --baseline-images 1 --size 64)
else
    PRIOR_ARGS=(--profile gpu-1B --device "$DEVICE" --batch 8 --steps 12)
    PRECISIONS=(fp16-per-resblock bf16)
    DVAE_ARGS=(--device "$DEVICE" --dtype bf16 --batch 8 --repeats 3)
    SAMPLE_ARGS=(--device "$DEVICE" --dtype bf16 --grids 32 --rows 64 --uncached-rows 16 --draws 16)
    INCEPTION_ARGS=(--device "$DEVICE" --images 2048 --batch-size 256 --baseline-images 16)
fi
if [ "$DEVICE" = cpu ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"; fi

run_part prior "$T_PRIOR" "$PYTHON" bench/prior.py "${PRIOR_ARGS[@]}" --precisions "${PRECISIONS[@]}"
if "$PYTHON" bench/prior.py --help 2>/dev/null | grep -q -- "--attention"; then
    run_part prior_attention "$T_ATTN" "$PYTHON" bench/prior.py "${PRIOR_ARGS[@]}" --precisions bf16 \
        --attention sdpa flex
else
    skip_part prior_attention "bench/prior.py --help does not list --attention: SDPA vs FlexAttention not measured"
fi
run_part dvae "$T_DVAE" "$PYTHON" bench/dvae.py "${DVAE_ARGS[@]}"
run_part sample "$T_SAMPLE" "$PYTHON" bench/sample.py "${SAMPLE_ARGS[@]}"
run_part inception "$T_INCEPTION" "$PYTHON" bench/inception.py "${INCEPTION_ARGS[@]}"

# summary.json: every part's status and the headline figures
"$PYTHON" - "$OUT" "$DEVICE" "$TINY" "$(( $(date +%s) - START ))" <<'PY'
import json, platform, subprocess, sys
from datetime import datetime, timezone
from pathlib import Path
out, device, tiny, total = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
parts = {n: json.loads((out / f"{n}.json").read_text()) for n in ("prior", "prior_attention", "dvae", "sample", "inception")}

def res(n):
    return parts[n].get("result") or {}

figures = {}
for run in res("prior").get("runs", []):
    figures[f"prior_{run.get('precision')}"] = {k: run.get(k) for k in
                                                 ("tokens_per_s", "step_s", "mfu", "achieved_tflops", "peak_memory_gib", "skipped_steps")}
if res("prior"):
    figures["prior_parameters"] = res("prior").get("parameters")
for run in res("prior_attention").get("runs", []):
    figures[f"attention_{run.get('attention', run.get('precision'))}"] = {
        k: run.get(k) for k in ("tokens_per_s", "step_s", "mfu", "peak_memory_gib")}
d = res("dvae")
if d:
    figures["dvae"] = {k: d.get(k) for k in ("dtype", "batch", "train_step_s", "train_images_per_s",
                                              "encode_images_per_s", "peak_memory_gib", "train_fraction_of_matmul_rate")}
s = res("sample")
if s:
    figures["sample"] = [{k: r.get(k) for k in ("grid", "rows", "cached_images_per_s", "cached_s_per_image",
                                                 "cache_speedup", "identical_tokens", "sparse_decode_speedup",
                                                 "draws_per_caption", "shared_caption_speedup",
                                                 "shared_caption_identical_tokens")} for r in s.get("results", [])]
i = res("inception")
if i:
    figures["inception"] = {k: i.get(k) for k in ("images_per_s", "batch_size", "batching_speedup", "peak_memory_gib")}
gpu = None
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    pass
try:
    import torch
    torch_version = torch.__version__
except Exception:  # noqa: BLE001
    torch_version = None
summary = {"check": "gpu_check", "device": device, "tiny": tiny, "gpu": gpu, "torch": torch_version,
           "host": platform.node(), "total_wall_s": total,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "parts": {n: {k: p.get(k) for k in ("ok", "skipped", "rc", "timed_out", "wall_s", "note", "error")}
                     for n, p in parts.items()},
           "all_ok": all(p["ok"] or p["skipped"] for p in parts.values()), "figures": figures}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({"summary": str(out / "summary.json"), "all_ok": summary["all_ok"], "total_wall_s": total}))
PY
