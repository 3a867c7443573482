#!/usr/bin/env bash
# Reproduce one table from a sweep spec, end to end, on this machine:
#   install, fetch MNIST if missing, run the sweep with the local launcher, collect the tables,
#   and write a manifest (command, commit, machine, wall time, torch) beside them.
#
#   bash scripts/reproduce.sh SPEC [RESULTS_DIR]
#     SPEC          e.g. sweeps/table1_cmnist_flip_quick.json
#     RESULTS_DIR   default: results/<spec name>
# Environment: DOMAINBED_SIL_DATA (default ./data), SWEEP_DIR (default sweep_output/<spec name>),
#   SKIP_INSTALL=1 to use the Python environment as it is, LAUNCH_FLAGS for extra launcher flags.
# Re-running the same command resumes: finished jobs are skipped, interrupted ones continue.
set -euo pipefail
cd "$(dirname "$0")/.."

spec="${1:?usage: bash scripts/reproduce.sh SPEC [RESULTS_DIR]}"
[ -f "$spec" ] || { echo "reproduce.sh: no sweep spec at $spec" >&2; exit 2; }
name="$(basename "$spec" .json)"
results="${2:-results/$name}"
export DOMAINBED_SIL_DATA="${DOMAINBED_SIL_DATA:-$PWD/data}"
sweep_dir="${SWEEP_DIR:-sweep_output/$name}"
python="${PYTHON:-python3}"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    "$python" -m pip install -q -e .
fi
"$python" -m domainbed_sil.download mnist --data_dir "$DOMAINBED_SIL_DATA"

start=$(date +%s)
# shellcheck disable=SC2086
"$python" -m domainbed_sil.sweep launch --sweep "$spec" --output_dir "$sweep_dir" \
    --data_dir "$DOMAINBED_SIL_DATA" --launcher local ${LAUNCH_FLAGS:-}
end=$(date +%s)
"$python" -m domainbed_sil.sweep status --sweep "$spec" --output_dir "$sweep_dir" --brief || true

mkdir -p "$results"
# every run's records beside the tables, so that the tables can be re-collected and checked
"$python" - "$sweep_dir" "$results/records" <<'PY'
import shutil, sys
from pathlib import Path
sweep_dir, records = Path(sys.argv[1]), Path(sys.argv[2])
for run in sorted(p.parent for p in sweep_dir.glob("*/results.jsonl")):
    (records / run.name).mkdir(parents=True, exist_ok=True)
    for name in ("results.jsonl", "done", "run.json"):
        if (run / name).exists():
            shutil.copy2(run / name, records / run.name / name)
PY
"$python" -m domainbed_sil.collect_results --input_dir "$sweep_dir" --format markdown latex csv --output "$results" --plots
"$python" - "$results/manifest.md" "$spec" "$sweep_dir" "$((end - start))" "${LAUNCH_FLAGS:-}" <<'PY'
import os, platform, subprocess, sys, torch
path, spec, sweep_dir, seconds, flags = sys.argv[1:6]
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip() or platform.processor()
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
# results/ is left out: this script has just written the tables there
dirty = " (with uncommitted changes)" if sh("git status --porcelain --untracked-files=no -- . ':(exclude)results'") else ""
lines = [
    f"# Manifest for {os.path.dirname(path)}",
    "",
    f"- command: `bash scripts/reproduce.sh {spec}`" + (f" with LAUNCH_FLAGS='{flags}'" if flags else ""),
    f"- sweep: `python -m domainbed_sil.sweep launch --sweep {spec} --output_dir {sweep_dir} --launcher local {flags}`".rstrip(),
    f"- collect: `python -m domainbed_sil.collect_results --input_dir {sweep_dir} --format markdown latex csv --output {os.path.dirname(path)} --plots`",
    f"- commit: {sh('git rev-parse HEAD')}{dirty}",
    f"- machine: {cpu}, {os.cpu_count()} cores visible, GPU: {gpu}",
    f"- torch {torch.__version__}, Python {platform.python_version()}; threads per job: the sweep's --threads (1 when not given)",
    f"- sweep wall time (this launch): {int(seconds) / 60:.1f} min",
    f"- date: {sh('date -u +%Y-%m-%dT%H:%MZ')}",
]
open(path, "w").write("\n".join(lines) + "\n")
print(f"wrote {path}")
PY
