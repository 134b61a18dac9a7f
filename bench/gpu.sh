#!/usr/bin/env bash
# GPU benchmarks in one go, for a machine with an NVIDIA GPU and no network:
#   bench/gpu.sh OUT_DIR [WHEEL_DIR]
# Installs from the wheels in WHEEL_DIR (torch CUDA build, onnxruntime-gpu, ctranslate2 and the
# project's dependencies, e.g. made with `pip download`), checks that ONNX Runtime really runs on
# the CUDA execution provider with the service's own loop, then runs the training and translation
# benchmarks on CUDA and writes their tables to OUT_DIR. Budget: under 8 minutes.
set -euo pipefail
OUT=${1:?usage: bench/gpu.sh OUT_DIR [WHEEL_DIR]}
WHEELS=${2:-wheels}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install --quiet --no-index --find-links "$WHEELS" torch onnxruntime-gpu ctranslate2
  .venv-gpu/bin/pip install --quiet --no-index --find-links "$WHEELS" -e ".[corpus]"
  .venv-gpu/bin/pip uninstall --quiet -y onnxruntime || true   # the CPU build would shadow the GPU one
fi
PY=.venv-gpu/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
timeout 120 $PY - <<'PY' | tee "$OUT/provider.txt"
import tempfile, torch
from pathlib import Path
from stepwise.train.checkpoint import Checkpoint
from stepwise.config import load_config
from stepwise.export import export_checkpoint
from stepwise.model import Transformer
from stepwise.decode.onnx_runtime import OnnxTranslator
from stepwise.tokenizer import Tokenizer
assert torch.cuda.is_available(), "torch sees no GPU"
texts = ["Im Anfang war das Wort.", "Und Gott sprach: Es werde Licht!"] * 20
tok = Tokenizer.train(texts, vocab_size=60)
cfg = load_config("config/tiny.json", [f"model.vocab_size={tok.vocab_size}"])
ck = Checkpoint(config=cfg, model_state=Transformer(cfg.model).state_dict(), tokenizer_model=tok.model_proto)
out = Path(tempfile.mkdtemp()) / "export"
export_checkpoint(ck, out, sentences=texts[:2])
translator = OnnxTranslator(out, device="cuda")
assert translator.provider == "CUDAExecutionProvider", translator.provider
print("provider:", translator.provider, translator.translate(texts[:2], beam_size=4, return_attention=True)[0].timings)
PY
timeout 200 $PY -m bench train --device cuda --train-steps 30 --out "$OUT"
timeout 300 $PY -m bench translate --device cuda --sentences 200 --rounds 1 --out "$OUT"
echo "tables in $OUT"
