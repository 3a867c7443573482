#!/usr/bin/env bash
# Stop the daemons scripts/start_slurm.sh started (by their pid files); other processes and an
# unrelated SLURM installation are left alone.  Idempotent.
set -euo pipefail

STATE="${DOMAINBED_SIL_SLURM_DIR:-/var/tmp/domainbed_sil_slurm}"

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "stop_slurm.sh: needs root (or sudo)" >&2; exit 1; }
    exec sudo -E "$0" "$@"
fi

stop() {  # stop <name> <pidfile>: SIGTERM, wait up to 10 s, then SIGKILL
    local name="$1" pidfile="$2" pid
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stop_slurm.sh: stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
stop munged "$STATE/munged.pid"
