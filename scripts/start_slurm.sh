#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (munge + slurmctld + slurmd), for the
# SLURM tests and for trying the slurm launcher locally.  Needs root (or sudo) and the
# Debian packages `slurm-wlm munge`.  Idempotent: a cluster it started earlier is reused.
#
#   scripts/start_slurm.sh          # start, wait until the node is idle
#   scripts/stop_slurm.sh           # stop what this script started
#
# The config goes to $SLURM_CONF (default /etc/slurm/slurm.conf, where sbatch/squeue look);
# an existing config not written by this script is never overwritten.  Daemon state, logs and
# pid files live in $DOMAINBED_SIL_SLURM_DIR (default /var/tmp/domainbed_sil_slurm).
set -euo pipefail

SLURM_CONF="${SLURM_CONF:-/etc/slurm/slurm.conf}"
STATE="${DOMAINBED_SIL_SLURM_DIR:-/var/tmp/domainbed_sil_slurm}"
MARKER="# written by domainbed_sil scripts/start_slurm.sh"
WAIT_S="${SLURM_START_TIMEOUT_S:-60}"

die() { echo "start_slurm.sh: $*" >&2; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "needs root (or sudo) to start munged, slurmctld and slurmd"
    exec sudo -E "$0" "$@"
fi
for tool in munged slurmctld slurmd scontrol sinfo; do
    command -v "$tool" >/dev/null || die "'$tool' not found; install the packages: apt-get install -y slurm-wlm munge"
done

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1 | tr -d '*~#'; }

wait_idle() {
    local deadline=$((SECONDS + WAIT_S)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state="$(node_state || true)"
        case "$state" in
            idle|mixed|allocated|completing) echo "start_slurm.sh: node $(hostname -s) is $state"; return 0 ;;
            down|drained|draining|fail)
                scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    die "node not idle after ${WAIT_S}s (state '${state:-unknown}'); see $STATE/slurmctld.log and $STATE/slurmd.log"
}

if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && alive "$STATE/munged.pid"; then
    echo "start_slurm.sh: already running (state in $STATE)"
    wait_idle
    exit 0
fi

if [ -f "$SLURM_CONF" ] && ! grep -qF "$MARKER" "$SLURM_CONF"; then
    die "$SLURM_CONF exists and was not written by this script; refusing to overwrite it (set SLURM_CONF to another path)"
fi

mkdir -p "$STATE/ctld" "$STATE/spool" "$(dirname "$SLURM_CONF")"

# --- munge: a key, then the daemon as user munge ------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if ! alive "$STATE/munged.pid"; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$STATE/munged.pid"
fi
munge -n | unmunge >/dev/null || die "munge does not work; see /var/log/munge/munged.log"

# --- slurm.conf: this node with its real CPUs and memory, reached on the loopback address ---
# (so a fresh machine whose host name does not resolve still works)
HOST="$(hostname -s)"
NODE_LINE="$(slurmd -C | head -n1)"   # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
cat > "$SLURM_CONF" <<CONF
$MARKER
ClusterName=domainbedsil
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# CPUs are the consumable resource; memory is not tracked, so jobs pack by CPU count
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# schedule often: a requeued job starts as soon as its begin time passes, not at the next 60 s pass
SchedulerParameters=sched_interval=2,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=60
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF
alive "$STATE/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
alive "$STATE/slurmd.pid" || slurmd -f "$SLURM_CONF"
wait_idle
