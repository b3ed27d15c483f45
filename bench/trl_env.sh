#!/bin/bash
# A separate virtual environment holding TRL, for the side-by-side benchmarks only (TRL is never
# a dependency of posttrain). Same torch and transformers as the project's .venv, so both sides
# run the same kernels.
#   bench/trl_env.sh 1.16.0   -> .bench/trl-1.16.0 (GRPOTrainer: bench/grpo.py --impl trl)
#   bench/trl_env.sh 1.12.0   -> .bench/trl-1.12.0 (PPOTrainer:  bench/ppo.py  --impl trl)
set -euo pipefail
ver="${1:?usage: bench/trl_env.sh TRL_VERSION}"
cd "$(dirname "$0")/.."
env=".bench/trl-$ver"
tf=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
acc=$(.venv/bin/python -c "import accelerate; print(accelerate.__version__)")
ds=$(.venv/bin/python -c "import datasets; print(datasets.__version__)")
if [ ! -x "$env/bin/python" ]; then
  python3.11 -m venv "$env"
  "$env/bin/pip" install -q torch==2.13.0
fi
"$env/bin/pip" install -q "trl==$ver" "transformers==$tf" "accelerate==$acc" "datasets==$ds"
"$env/bin/python" -c "import trl, transformers, torch; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
