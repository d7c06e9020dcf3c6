#!/usr/bin/env bash
# Creates .venv and installs the pinned requirements; a second run with nothing changed takes about a second.
#   ./setup.sh          runtime dependencies
#   ./setup.sh --dev    plus the test dependencies and the storage emulators (Azurite from npm)
#   ./setup.sh --wandb  plus Weights & Biases
set -euo pipefail
cd "$(dirname "$0")"

want_dev=0 want_wandb=0 quiet=0
for arg in "$@"; do
  case "$arg" in
    --dev) want_dev=1 ;;
    --wandb) want_wandb=1 ;;
    --quiet) quiet=1 ;;
    *) echo "setup.sh: unknown flag $arg (valid: --dev --wandb --quiet)" >&2; exit 2 ;;
  esac
done
say() { [ "$quiet" = 1 ] || echo "$@"; }

python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($python_bin --version)"
  "$python_bin" -m venv .venv
fi

files=(requirements.txt)
[ "$want_dev" = 1 ] && files+=(requirements-dev.txt)
[ "$want_wandb" = 1 ] && files+=(requirements-wandb.txt)
for file in "${files[@]}"; do
  stamp=".venv/.installed-$(basename "$file")"
  digest=$(sha256sum "$file" | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    say "installing $file"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$file"
    echo "$digest" > "$stamp"
  fi
done

if [ "$want_dev" = 1 ]; then
  # The npm pin lives in requirements-dev.txt as a comment, beside the PyPI emulators.
  azurite_version=$(grep -o 'azurite@[0-9.]*' requirements-dev.txt | head -n1 | cut -d@ -f2)
  if [ ! -x .cache/node/node_modules/.bin/azurite-blob ]; then
    command -v npm >/dev/null || { echo "setup.sh: npm not found; install Node.js 20 for the Azure Blob emulator" >&2; exit 1; }
    say "installing the Azure Blob emulator (azurite@$azurite_version) into .cache/node"
    npm install --silent --no-audit --no-fund --prefix .cache/node "azurite@$azurite_version" >/dev/null
  fi
fi

if [ "$quiet" = 0 ]; then
  .venv/bin/python - <<'PY'
import os
import accelerate, numpy, safetensors, torch, transformers
cuda = torch.cuda.is_available()
gpus = torch.cuda.device_count() if cuda else 0
bf16 = cuda and torch.cuda.is_bf16_supported()
print(f"ready: torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}")
print(f"devices: {os.cpu_count()} CPU cores, {gpus} GPU(s)" + (f" ({torch.cuda.get_device_name(0)}), bf16 {'yes' if bf16 else 'no'}" if gpus else ", bf16 n/a (CPU)"))
PY
fi
