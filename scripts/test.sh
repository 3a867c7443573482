#!/usr/bin/env bash
# The test command: install what the tests need, start a one-node SLURM cluster on localhost,
# run the whole suite, stop the cluster.
#   DOMAINBED_SIL_DATA   data directory (default ./data; MNIST is fetched there if missing).
#                        The PACS_mini / VLCS_mini samples come with the project's shared data
#                        folder; without them the image tests are skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y slurm-wlm munge
fi

python3 -m pip install -e ".[test]"

export DOMAINBED_SIL_DATA="${DOMAINBED_SIL_DATA:-$PWD/data}"
python3 -m domainbed_sil.download mnist --data_dir "$DOMAINBED_SIL_DATA"

trap 'scripts/stop_slurm.sh || true' EXIT
scripts/start_slurm.sh

# pytest's exit 5 (no tests collected) is a failure here like any other non-zero status
python3 -m pytest -q tests
