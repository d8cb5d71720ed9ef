#!/usr/bin/env bash
# CI check of the asv suite: `asv check`, then every benchmark run once on tiny shapes
# (NBXENT_ASV_QUICK=1) in the current Python, against this checkout's nbxent.
#
# Fails when discovery fails, when any benchmark or parameter combination fails (asv's exit
# status is checked, and so are the saved results, since a benchmark that never reported is
# not always counted as a failure), or when the run exceeds NBXENT_ASV_CI_TIMEOUT seconds
# (default 600). Skipped cases (the GPU suite without a GPU, PyTorch missing) pass.
# Results go to a temporary folder, so .asv/results keeps only real measurements.
# asv's forkserver (`--launch-method forkserver`) imports the benchmark modules once and forks
# a process per parameter combination, where the default spawns a new interpreter for each
# (Numba, NumPy, and in quick mode PyTorch imported anew 176 times): 261 s -> 106 s on the
# 2-core CI machine (2026-11-28).
#
#   bash benchmarks/ci_quick.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# asv drops PYTHONPATH from what it runs; ASV_PYTHONPATH is passed on as PYTHONPATH, so the
# benchmarks import this checkout's nbxent whatever else is installed.
export ASV_PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export NBXENT_ASV_QUICK=1

# The project's config with the results, environments and HTML moved to the temporary folder.
python - "$root" "$work" <<'EOF'
import json, sys
from asv import util
root, work = sys.argv[1:]
conf = util.load_json(f"{root}/asv.conf.json", js_comments=True)
conf.update(repo=root, benchmark_dir=f"{root}/benchmarks", results_dir=f"{work}/results",
            env_dir=f"{work}/env", html_dir=f"{work}/html")
json.dump(conf, open(f"{work}/asv.conf.json", "w"), indent=2)
EOF
conf="$work/asv.conf.json"

asv machine --config "$conf" --machine ci-quick --yes >/dev/null
asv check --config "$conf" --python=same

status=0
timeout "${NBXENT_ASV_CI_TIMEOUT:-600}" \
    asv run --config "$conf" --machine ci-quick --python=same --quick --launch-method forkserver --show-stderr \
    --set-commit-hash "$(git rev-parse HEAD)" || status=$?
if [ "$status" -eq 124 ]; then
    echo "ci_quick: asv run took longer than ${NBXENT_ASV_CI_TIMEOUT:-600} s" >&2
    exit 1
fi

# Every discovered benchmark must have a result for every parameter combination: None is a
# failure (or a missing result), NaN a skip.
python - "$work/results" <<'EOF'
import glob, itertools, math, sys
from asv import util
from asv.results import Results
results_dir = sys.argv[1]
benchmarks = util.load_json(f"{results_dir}/benchmarks.json", api_version=2)
files = [f for f in glob.glob(f"{results_dir}/ci-quick/*.json") if not f.endswith("machine.json")]
if len(files) != 1:
    sys.exit(f"ci_quick: expected one results file, found {files}")
res = Results.load(files[0])
counts = {"ran": 0, "skipped": 0, "failed": 0}
for name, bench in sorted(benchmarks.items()):
    if name == "version":
        continue
    try:
        values = res.get_result_value(name, bench["params"])
    except KeyError:
        values = [None]
    combos = list(itertools.product(*bench["params"])) or [()]
    for combo, v in zip(combos, values):
        if v is None:
            counts["failed"] += 1
            print(f"ci_quick: FAILED {name}({', '.join(combo)})")
        elif isinstance(v, float) and math.isnan(v):
            counts["skipped"] += 1
        else:
            counts["ran"] += 1
print("ci_quick: {ran} ran, {skipped} skipped, {failed} failed".format(**counts))
sys.exit(1 if counts["failed"] or not counts["ran"] else 0)
EOF
if [ "$status" -ne 0 ]; then
    echo "ci_quick: asv run exited with status $status" >&2
    exit "$status"
fi
