#!/usr/bin/env bash
# A SLURM cluster of several nodes on this one machine, for the launcher tests (tests/e2e/test_slurm_*.py).
#
#   tests/slurm/local_cluster.sh start    install (Debian packages), build the test network, start
#                                         munge, slurmctld and one slurmd per node
#   tests/slurm/local_cluster.sh stop     stop the daemons this script started, remove the network
#   tests/slurm/local_cluster.sh status   exit 0 when every node answers and is usable
#
# TESSERA_TEST_NODES (default 2) sets the number of nodes. Idempotent: `start` on a running
# cluster returns at once. Needs root (apt-get, ip netns, /etc/slurm, /etc/hosts).
#
# Layout: slurmctld runs here, on the bridge tsr-br0 (10.213.0.1); node i is a network namespace
# tsr-nI holding one end of a veth pair (10.213.0.1I) whose other end sits on the bridge, and its
# slurmd runs in that namespace and in a UTS namespace of its own, so jobs on it see the hostname
# tessera-nI (log lines name it; gloo binds the address that name resolves to). The names are added
# to /etc/hosts, which every namespace shares, and so are the file system, /dev/shm and munge's
# socket. The subnet is the test's own: nothing is routed or forwarded out of it.
#
# No accounting (slurmdbd): `tessera status` reads job states from squeue / scontrol, which is
# enough here. Pitfalls: munged refuses to run as root, and
# requeued jobs wait for the credential to expire (cred_expire=10 keeps that to seconds).
set -euo pipefail

STATE=/var/lib/tessera-slurm          # pid files, logs and spool of this test cluster
CONF=/etc/slurm/slurm.conf
NODES=${TESSERA_TEST_NODES:-2}
SUBNET=10.213.0                       # a private /24 of the test's own
BRIDGE=tsr-br0
CTLD_ADDR=$SUBNET.1
HOSTS_MARK="# tessera test cluster"

log() { echo "[local_cluster] $*" >&2; }

node_name() { echo "tessera-n$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

nodes_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local states ready
    states=$(timeout 3 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    ready=$(awk '$2 ~ /^(idle|mix|alloc|comp)/ {print $1}' <<<"$states" | sort -u | wc -l)
    (( ready >= NODES ))
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && command -v ip >/dev/null && command -v unshare >/dev/null; then
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || { log "installing SLURM needs root"; return 1; }
    log "installing slurmctld slurmd slurm-client munge iproute2 util-linux"
    local packages=(slurmctld slurmd slurm-client munge iproute2 util-linux)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${packages[@]}" >/dev/null 2>&1 || {
        apt-get update >/dev/null 2>&1
        apt-get install -y --no-install-recommends "${packages[@]}" >/dev/null
    }
}

# The bridge, one namespace per node and the names in /etc/hosts; each step skipped when done.
setup_network() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    local i ns
    for i in $(seq "$NODES"); do
        ns=tsr-n$i
        ip netns list | grep -qw "$ns" || ip netns add "$ns"
        if ! ip link show "tsr-v$i" >/dev/null 2>&1; then
            ip link add "tsr-v$i" type veth peer name eth0 netns "$ns"
            ip link set "tsr-v$i" master "$BRIDGE"
            ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
        fi
        ip link set "tsr-v$i" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
    # /etc/hosts may be a bind mount (containers): rewrite it in place, never replace the file.
    local hosts
    hosts=$(grep -v "$HOSTS_MARK" /etc/hosts || true)
    for i in $(seq "$NODES"); do hosts+=$'\n'"$(node_addr "$i") $(node_name "$i") $HOSTS_MARK"; done
    printf '%s\n' "$hosts" > /etc/hosts
}

teardown_network() {
    local ns
    for ns in $(ip netns list | awk '$1 ~ /^tsr-n[0-9]+$/ {print $1}'); do ip netns del "$ns"; done
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
    if grep -q "$HOSTS_MARK" /etc/hosts; then
        local hosts
        hosts=$(grep -v "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$hosts" > /etc/hosts
    fi
}

write_config() {
    mkdir -p /etc/slurm "$STATE/ctld" /var/log/slurm
    # Each node as slurmd sees this machine; CPUs are declared as at least 8 (config_overrides lets
    # slurmd accept that) so demo-sized requests (2 ranks x 2 cores) schedule on a 2-core machine.
    # The nodes share the machine: nothing enforces CPU or memory limits, they are bookkeeping.
    local topo cpus mem names="" i
    topo=$(slurmd -C | head -n1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$topo")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$topo")
    (( cpus < 8 )) && cpus=8
    mem=$(( mem * 9 / 10 ))
    {
        cat <<CONF
# Written by tessera tests/slurm/local_cluster.sh: a test cluster of $NODES nodes on one machine.
ClusterName=tessera-test
SlurmctldHost=$(hostname -s)($CTLD_ADDR)
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
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
CONF
        for i in $(seq "$NODES"); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
            names+="${names:+,}$(node_name "$i")"
        done
        echo "PartitionName=debug Nodes=${names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
    } > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
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

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_slurmd() {
    local i=$1 name
    name=$(node_name "$i")
    running "$STATE/slurmd-$name.pid" && return 0
    mkdir -p "$STATE/d-$name"
    # Inside the node's network namespace, with a hostname (UTS namespace) and a /dev/shm (mount
    # namespace) of its own, as a real node has: mosaicml-streaming and DeepSpeed name their
    # shared memory per node, and two nodes sharing one /dev/shm would collide. nsenter, not
    # `ip netns exec`: that remounts /sys, hiding the cgroup file system slurmd needs.
    nsenter --net="/run/netns/tsr-n$i" unshare --uts --mount sh -c \
        'mount -t tmpfs tmpfs /dev/shm && echo "$1" > /proc/sys/kernel/hostname && exec slurmd -D -N "$1"' \
        sh "$name" >>"$STATE/slurmd-$name.out" 2>&1 &
}

start() {
    if nodes_ready; then log "already running ($NODES nodes)"; return 0; fi
    install_packages
    mkdir -p "$STATE"
    setup_network
    write_config
    start_munge
    if ! running "$STATE/slurmctld.pid"; then
        slurmctld -D -i >>"$STATE/slurmctld.out" 2>&1 &
    fi
    local i
    for i in $(seq "$NODES"); do start_slurmd "$i"; done
    local deadline=$((SECONDS + 60))
    while (( SECONDS < deadline )); do
        if nodes_ready; then log "$NODES nodes ready: $(sinfo -h -N -o '%N' | sort -u | paste -sd' ')"; return 0; fi
        sleep 0.5
    done
    log "the nodes did not become ready (logs in $STATE)"; sinfo -N >&2 || true; return 1
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
    local file
    for file in "$STATE"/slurmd*.pid; do stop_pidfile "$file"; done
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/munged.pid"
    teardown_network
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) nodes_ready ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
