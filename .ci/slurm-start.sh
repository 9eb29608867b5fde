#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (as root), for
# tests/test_distributed_slurm.py: munge, slurmctld and slurmd from Debian's
# packages (installed here when missing: apt-get update, apt-get install -y
# slurmctld slurmd slurm-client munge).
#
#   bash .ci/slurm-start.sh          # prints the partition, exits 0 once sinfo shows the node idle
#   python -m pytest tests/test_distributed_slurm.py   # runs where sinfo shows an idle node
#   bash .ci/slurm-start.sh stop
#
# Everything lives under /tmp/bamflow-slurm (state, logs, spool); the config
# is /etc/slurm/slurm.conf (written here). Idempotent: a running cluster is
# left as it is.
set -euo pipefail

base=/tmp/bamflow-slurm
conf=/etc/slurm/slurm.conf

stop() {
    for pidfile in "$base"/slurmd.pid "$base"/slurmctld.pid "$base"/munged.pid; do
        if [ -f "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
}

if [ "${1:-}" = stop ]; then
    stop
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
fi

if sinfo -h -o %T 2>/dev/null | grep -q -E '^(idle|mixed|allocated)'; then
    sinfo
    exit 0
fi

mkdir -p "$base"/state "$base"/spool "$base"/log /etc/slurm /run/munge /var/log/munge /var/lib/munge
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

# munge: a key, and the daemon (as root: --force, since it prefers its own user)
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    munged --force --pid-file="$base"/munged.pid 2>/dev/null || munged --force
fi

cat > "$conf" <<EOF
ClusterName=bamflow
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$base/state
SlurmdSpoolDir=$base/spool
SlurmctldPidFile=$base/slurmctld.pid
SlurmdPidFile=$base/slurmd.pid
SlurmctldLogFile=$base/log/slurmctld.log
SlurmdLogFile=$base/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

slurmctld
slurmd
for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -q -E '^(idle|mixed|allocated)'; then
        sinfo
        exit 0
    fi
    sleep 1
done
echo "slurm did not come up; logs in $base/log" >&2
tail -n 20 "$base"/log/*.log >&2 || true
exit 1
