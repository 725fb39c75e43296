#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the launcher tests (tests/e2e/test_slurm_*.py).
#
#   tests/slurm/local_cluster.sh start    install (Debian packages) and start munge, slurmctld, slurmd
#   tests/slurm/local_cluster.sh stop     stop the daemons this script started
#   tests/slurm/local_cluster.sh status   exit 0 when the node answers and is usable
#
# Idempotent: `start` on a running cluster returns at once. Needs root (apt-get, /etc/slurm).
# No accounting (slurmdbd): `tessera status` reads job states from squeue / scontrol, which is
# enough here. Pitfalls: munged refuses to run as root, and
# requeued jobs wait for the credential to expire (cred_expire=10 keeps that to seconds).
set -euo pipefail

STATE=/var/lib/tessera-slurm          # pid files, logs and spool of this test cluster
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

log() { echo "[local_cluster] $*" >&2; }

node_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(timeout 5 sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null | head -n1) || return 1
    [[ "$state" =~ ^(idle|mix|alloc|comp) ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || { log "installing SLURM needs root"; return 1; }
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
        apt-get update >/dev/null 2>&1
        apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    }
}

write_config() {
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm
    # The node as slurmd sees it; CPUs are declared as at least 8 (config_overrides lets slurmd
    # accept that) so demo-sized requests (2 ranks x 2 cores) schedule on a 2-core machine.
    local topo cpus mem
    topo=$(slurmd -C | head -n1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$topo")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$topo")
    (( cpus < 8 )) && cpus=8
    mem=$(( mem * 9 / 10 ))
    cat > "$CONF" <<CONF
# Written by tessera tests/slurm/local_cluster.sh: a one-node test cluster.
ClusterName=tessera-test
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
KillWait=15
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
}

start_munge() {
    if pgrep -u munge -x munged >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    [[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    # munged refuses to run as root ("PRNG seed dir is insecure"): run it as its own user.
    setpriv --reuid=munge --regid=munge --init-groups munged --foreground >>"$STATE/munged.log" 2>&1 &
    echo $! > "$STATE/munged.pid"
    for _ in $(seq 50); do [[ -S /run/munge/munge.socket.2 ]] && return 0; sleep 0.1; done
    log "munged did not start (see $STATE/munged.log)"; return 1
}

start() {
    if node_ready; then log "already running"; return 0; fi
    install_packages
    mkdir -p "$STATE"
    write_config
    start_munge
    if ! [[ -f "$STATE/slurmctld.pid" ]] || ! kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
        slurmctld -D -i >>"$STATE/slurmctld.out" 2>&1 &
    fi
    if ! [[ -f "$STATE/slurmd.pid" ]] || ! kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null; then
        slurmd -D -N "$HOST" >>"$STATE/slurmd.out" 2>&1 &
    fi
    for _ in $(seq 120); do
        if node_ready; then log "node $HOST ready"; return 0; fi
        sleep 0.5
    done
    log "the node did not become ready (logs in $STATE)"; return 1
}

stop_pidfile() {
    local file=$1
    [[ -f "$file" ]] || return 0
    local pid; pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$file"
}

stop() {
    stop_pidfile "$STATE/slurmd.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/munged.pid"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) node_ready ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
