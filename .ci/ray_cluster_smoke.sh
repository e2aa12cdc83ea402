#!/usr/bin/env bash
# Start a real local Ray cluster, purify a model through RAY_ADDRESS, stop the cluster whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
work=$(mktemp -d /tmp/raysmoke.XXXX)
port=$((20000 + RANDOM % 20000))
cleanup() { ray stop --force >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
python - "$work" <<'PY'
import sys
from pathlib import Path
from defense.scenario import backdoored_scenario
from defense.modelio import save_model
s = backdoored_scenario(cache=None, epochs=5)
save_model(s.teacher, Path(sys.argv[1]) / "teacher", "small-cnn", s.bundle.spec, {"tool": "ci"})
PY
ray start --head --num-cpus 2 --port "$port" --temp-dir "$work/ray" --include-dashboard=false --disable-usage-stats >/dev/null
RAY_ADDRESS="127.0.0.1:$port" python -m deploy.purify "$work/teacher.json" --out "$work/purified" \
  --storage "$work/storage" --set epochs=1 iters_per_epoch=2 batch_size=16 perturbations.warmup_steps=20 \
  perturbations.refresh_steps=10
python -m defense.evaluate "$work/purified.json" --attack badnets --trigger-size 3 --target 0
echo "ray cluster smoke ok"
