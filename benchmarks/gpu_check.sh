#!/usr/bin/env bash
# The GPU check (issues 4 and 18): on a machine with one NVIDIA H100/H200, in under 8 minutes.
#   1. the CUDA tests: fp16 + GradScaler, bf16, a real out-of-memory back-off, DDP with NCCL,
#      CUDA-graph steps against eager ones (loss curve, exact resume, DDP refused), and the
#      training job's GPU memory gauge read at scrape time;
#   2. the training benchmark on 10M x 100 synthetic samples: eager against CUDA-graph steps at
#      batch 4,096, 16,384 and 65,536, 100-epoch bf16 runs at 4,096 and 65,536, fp32 / fp16,
#      torch.compile, and the CPU figure for the ratio;
#   3. the sequence transformer (issue 16; its default size, the card's last 32 events) on
#      1M synthetic rows: one epoch each in fp32 and bf16 at batch 4,096, samples/s and ratio.
# Every figure lands in one JSON file: $OUT/gpu_check.json (OUT defaults to runs/gpu_check).
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY

started=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
  --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true
set +e
"$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -W default \
  tests/train/test_gpu.py tests/train/test_metrics_server.py \
  --junitxml="$OUT/gpu_tests.xml" -s 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
"$PYTHON" benchmarks/train_gpu.py --out "$OUT/train_gpu.json" 2>&1 | tee "$OUT/train_gpu.log"

# The transformer through the one training loop: shared event table, per-row histories.
"$PYTHON" - "$OUT/transformer_gpu.json" "${TRANSFORMER_DEVICE:-cuda}" "${TRANSFORMER_ROWS:-1000000}" <<'PY' 2>&1 | tee "$OUT/transformer_gpu.log"
import json, sys, tempfile
from pathlib import Path
import numpy as np, torch
from fraudflow.config import ModelConfig, RunConfig, TrainConfig
from fraudflow.features.sequences import card_histories
from fraudflow.models import FeatureLayout, build_model
from fraudflow.train.distributed import single_process
from fraudflow.train.loop import TensorData, fit
out, device, n = Path(sys.argv[1]), torch.device(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
cards = rng.integers(0, max(n // 100, 1), size=n)
length = ModelConfig().transformer.sequence_length
history, gaps = card_histories(cards, np.sort(rng.uniform(0, 9e6, size=n)), length)
events = torch.from_numpy(rng.normal(size=(n, 40)).astype(np.float32))
labels = torch.from_numpy((rng.uniform(size=n) < 0.01).astype(np.int64))
def data(rows: slice) -> TensorData:
    inputs = {"history": torch.from_numpy(history[rows]), "gaps": torch.from_numpy(gaps[rows])}
    return TensorData(inputs=inputs, labels=labels[rows], shared={"events": events})
train, valid = data(slice(0, n - n // 20)), data(slice(n - n // 20, n))
result = {"rows": n, "sequence_length": length, "device": str(device)}
for amp in ("off", "bf16"):
    cfg = RunConfig(train=TrainConfig(model="transformer", epochs=1, batch_size=4096, amp=amp,
                                      device=device.type))
    model = build_model("transformer", layout=FeatureLayout(40), cfg=cfg)
    with tempfile.TemporaryDirectory() as tmp:
        fitted = fit(model, train, valid, cfg.train, dist_ctx=single_process(device),
                     checkpoint_dir=Path(tmp))
    result[f"samples_per_second_{amp}"] = fitted.samples_per_second
    print(f"transformer {amp}: {fitted.samples_per_second:,.0f} samples/s", flush=True)
result["bf16_over_fp32"] = result["samples_per_second_bf16"] / result["samples_per_second_off"]
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result))
PY

"$PYTHON" - "$OUT" "$tests_rc" "$started" <<'PY'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, started = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
root = ET.parse(out / "gpu_tests.xml").getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
summary = {"tests": tests, "tests_exit_code": tests_rc,
           "train": json.loads((out / "train_gpu.json").read_text()),
           "transformer": json.loads((out / "transformer_gpu.json").read_text()),
           "total_seconds": time.time() - started}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("tests", "tests_exit_code", "total_seconds")}))
PY
exit "$tests_rc"
