#!/bin/sh
# A throwaway one-machine SLURM cluster on 127.0.0.1 for tests: munged, slurmctld and slurmd
# with their state, sockets, logs and slurm.conf under DIR (nothing in /etc is changed).
#   scripts/slurm-test-cluster.sh start DIR [SLURMCTLD_PORT SLURMD_PORT]   (default 6917 6918)
#       -> prints the slurm.conf path: export SLURM_CONF=DIR/slurm.conf for sbatch/srun/squeue
#   scripts/slurm-test-cluster.sh stop DIR
# Installs Debian's slurm-wlm and munge with apt-get when they are missing (as root). The node
# is this machine (its hostname, NodeAddr 127.0.0.1, at least 4 CPUs), ProctrackType
# proctrack/linuxproc and TaskPlugin task/none (no cgroups needed), SelectType cons_tres.
# Fails loudly (exit 1, the reason on stderr) when the daemons cannot be installed or started;
# the tests hand that reason to require_service (a failure under CI=true).
set -eu
usage() {
    echo "usage: $0 start DIR [SLURMCTLD_PORT SLURMD_PORT] | stop DIR" >&2
    exit 2
}
die() {
    echo "slurm-test-cluster.sh: $*" >&2
    exit 1
}
[ $# -ge 2 ] || usage
cmd=$1
dir=$2
PATH=$PATH:/usr/sbin:/sbin
stop_pid() {
    [ -f "$1" ] || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 50 ]; do
        sleep 0.2
        i=$((i + 1))
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1"
}
case $cmd in
start)
    ctld_port=${3:-6917}
    slurmd_port=${4:-6918}
    if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
        [ "$(id -u)" -eq 0 ] || die "slurm-wlm and munge are not installed (apt-get install slurm-wlm munge, as root)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q slurm-wlm munge >"${TMPDIR:-/tmp}/slurm-test-apt.log" 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >"${TMPDIR:-/tmp}/slurm-test-apt.log" 2>&1; } ||
            die "apt-get install slurm-wlm munge failed: $(tail -n 5 "${TMPDIR:-/tmp}/slurm-test-apt.log")"
    fi
    [ "$(id -u)" -eq 0 ] || die "slurmd must run as root (it starts jobs as their users)"
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge" "$dir/log"
    chmod 700 "$dir/munge"
    host=$(hostname -s)
    # CPUs: at least 4 (config_overrides: slurmd takes the configured count), so a 2-task job
    # fits on a 1- or 2-core machine; getconf, not nproc (nproc obeys OMP_NUM_THREADS)
    cpus=$(getconf _NPROCESSORS_ONLN)
    [ "$cpus" -ge 4 ] || cpus=4
    # munge: a fresh key and its own socket
    if [ ! -f "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 2>/dev/null
        chmod 400 "$dir/munge/munge.key"
    fi
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" ||
        die "munged did not start: $(tail -n 5 "$dir/log/munged.log" 2>/dev/null)"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=dalle-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$dir/slurm.conf" -i || die "slurmctld did not start: $(tail -n 5 "$dir/log/slurmctld.log" 2>/dev/null)"
    slurmd -f "$dir/slurm.conf" || die "slurmd did not start: $(tail -n 5 "$dir/log/slurmd.log" 2>/dev/null)"
    i=0
    until [ "$(sinfo -h -n "$host" -o %t 2>/dev/null)" = "idle" ]; do
        i=$((i + 1))
        [ $i -lt 120 ] || die "node $host not idle after 60 s (sinfo: $(sinfo -h -o '%n %t' 2>&1)); \
slurmctld: $(tail -n 5 "$dir/log/slurmctld.log" 2>/dev/null); slurmd: $(tail -n 5 "$dir/log/slurmd.log" 2>/dev/null)"
        sleep 0.5
    done
    echo "$dir/slurm.conf"
    ;;
stop)
    stop_pid "$dir/slurmd.pid"
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/munge/munged.pid"
    ;;
*)
    usage
    ;;
esac
