#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and small sites.
#
#   hpc/slurm-local.sh start    install (when absent) and start munged, slurmctld, slurmd;
#                               wait until `srun hostname` works; print `export SLURM_CONF=...`
#   hpc/slurm-local.sh stop     cancel the jobs, stop exactly the daemons started here
#   hpc/slurm-local.sh status   daemons, sinfo and squeue; exit 0 when all three run
#   hpc/slurm-local.sh config   print the slurm.conf that `start` writes
#
# Typical use:  eval "$(hpc/slurm-local.sh start)"; sbatch ...; hpc/slurm-local.sh stop
#
# Configuration, state, logs, the munge key and socket all live in one folder,
# $SURVEY_QA_SLURM_DIR (default /tmp/survey-qa-slurm); nothing under /etc is changed.
# Other settings: SURVEY_QA_SLURM_PORT (slurmctld port, slurmd uses the next one; default
# 6817), SURVEY_QA_SLURM_PARTITION (default "debug"), SURVEY_QA_SLURM_DEF_MEM_MB (memory
# per CPU of a job that asks for none; default 1024).
# Every command is idempotent: `start` on a running cluster only checks it, `stop` on a
# stopped one does nothing. Daemons are stopped only by the PIDs in this folder's PID files.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin   # the daemons live in sbin, often not on a user's PATH

DIR=${SURVEY_QA_SLURM_DIR:-/tmp/survey-qa-slurm}
CTLD_PORT=${SURVEY_QA_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))
PARTITION=${SURVEY_QA_SLURM_PARTITION:-debug}
DEF_MEM_MB=${SURVEY_QA_SLURM_DEF_MEM_MB:-1024}
WAIT_S=${SURVEY_QA_SLURM_WAIT_S:-90}

ETC=$DIR/etc
CONF=$ETC/slurm.conf
RUN=$DIR/run
LOGS=$DIR/log
STATE=$DIR/state
MUNGE=$DIR/munge
MUNGE_SOCKET=$MUNGE/munge.socket.2
PACKAGES=(munge slurmctld slurmd slurm-client)
DAEMONS=(slurmd slurmctld munged)   # stop order; start order is the reverse

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

pidfile() { echo "$RUN/$1.pid"; }

# Print the PID of daemon $1 when its PID file names a live process of that name.
daemon_pid() {
    local name=$1 file pid comm
    file=$(pidfile "$name")
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]] || return 1
    echo "$pid"
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "'$*' needs root (or passwordless sudo)"
    fi
}

install_if_missing() {
    local missing=0 cmd
    for cmd in munged mungekey slurmctld slurmd sbatch srun sinfo squeue scancel scontrol; do
        command -v "$cmd" >/dev/null || missing=1
    done
    [[ $missing -eq 0 ]] && return 0
    log "installing ${PACKAGES[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${PACKAGES[@]}" >&2
}

# The node line: what slurmd detects, else nproc and /proc/meminfo.
node_line() {
    local host line cpus mem_mb
    host=$(hostname -s)
    if command -v slurmd >/dev/null && line=$(slurmd -C 2>/dev/null | head -n 1) \
            && [[ $line == NodeName=* ]]; then
        echo "$line NodeAddr=127.0.0.1 State=UNKNOWN"
        return
    fi
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    echo "NodeName=$host CPUs=$cpus RealMemory=$mem_mb NodeAddr=127.0.0.1 State=UNKNOWN"
}

slurm_user() {
    if [[ $(id -u) -eq 0 ]]; then echo root; else id -un; fi
}

render_config() {
    cat <<EOF
# Written by hpc/slurm-local.sh: a single-node cluster, no cgroups, no accounting.
ClusterName=surveyqa
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$(slurm_user)
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
PlugStackConfig=$ETC/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM_MB
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
$(node_line)
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

write_config() {
    mkdir -p "$ETC" "$RUN" "$LOGS" "$STATE/slurmctld" "$STATE/slurmd"
    chmod 755 "$DIR" "$ETC" "$RUN" "$LOGS"
    render_config >"$CONF.tmp"
    : >"$ETC/plugstack.conf"
    mv "$CONF.tmp" "$CONF"
    chmod 644 "$CONF" "$ETC/plugstack.conf"
}

start_munged() {
    if daemon_pid munged >/dev/null; then return 0; fi
    local run_as=()
    mkdir -p "$MUNGE"
    if [[ ! -s $MUNGE/munge.key ]]; then
        mungekey --create --keyfile="$MUNGE/munge.key" 2>/dev/null \
            || dd if=/dev/urandom of="$MUNGE/munge.key" bs=1 count=1024 status=none
    fi
    chmod 755 "$MUNGE"
    chmod 600 "$MUNGE/munge.key"
    # munged refuses to run as root without --force: use the packaged munge user.
    if [[ $(id -u) -eq 0 ]] && id munge >/dev/null 2>&1; then
        chown -R munge: "$MUNGE"
        touch "$(pidfile munged)"
        chown munge: "$(pidfile munged)"
        run_as=(runuser -u munge --)
    fi
    rm -f "$MUNGE_SOCKET"
    "${run_as[@]}" munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE/munge.key" \
        --pid-file="$(pidfile munged)" --log-file="$MUNGE/munged.log" \
        --seed-file="$MUNGE/munged.seed"
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -S $MUNGE_SOCKET ]] && daemon_pid munged >/dev/null && break
        sleep 0.2
    done
    munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET" >/dev/null \
        || die "munged does not answer; see $MUNGE/munged.log"
    log "munged running (pid $(daemon_pid munged))"
}

start_daemon() {
    local name=$1 i
    if daemon_pid "$name" >/dev/null; then return 0; fi
    rm -f "$(pidfile "$name")"
    "$name" -f "$CONF" || die "$name did not start; see $LOGS/$name.log"
    for ((i = 0; i < 50; i++)); do
        daemon_pid "$name" >/dev/null && break
        sleep 0.2
    done
    daemon_pid "$name" >/dev/null || die "$name exited; see $LOGS/$name.log"
    log "$name running (pid $(daemon_pid "$name"))"
}

# Wait until the node takes jobs and a real job step runs.
wait_ready() {
    local deadline=$((SECONDS + WAIT_S)) state host
    host=$(hostname -s)
    while :; do
        state=$(sinfo -h -N -n "$host" -o '%T' 2>/dev/null | head -n 1 || true)
        case $state in
            idle* | mixed* | allocated* | completing*) break ;;
            down* | drain* | drained* | fail*)
                scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
        esac
        ((SECONDS < deadline)) || die "node $host is '${state:-unreachable}' after ${WAIT_S}s; see $LOGS"
        sleep 1
    done
    local out
    out=$(timeout "$WAIT_S" srun -N 1 -n 1 -t 1 --mem=64 -J survey-qa-check hostname 2>&1) \
        || die "srun hostname failed: $out"
    log "srun hostname -> $out"
}

cmd_start() {
    install_if_missing
    if [[ $(id -u) -ne 0 ]]; then
        die "start needs root: slurmd must run as root to start jobs (try sudo -E $0 start)"
    fi
    local any=0 d
    for d in "${DAEMONS[@]}"; do daemon_pid "$d" >/dev/null && any=1; done
    # Keep the configuration of a running cluster; write it afresh otherwise.
    if [[ $any -eq 0 || ! -s $CONF ]]; then write_config; fi
    export SLURM_CONF=$CONF
    start_munged
    start_daemon slurmctld
    start_daemon slurmd
    wait_ready
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    export SLURM_CONF=$CONF
    if daemon_pid slurmctld >/dev/null && [[ -s $CONF ]]; then
        local jobs i
        jobs=$(timeout 20 squeue -h -o '%A' 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            timeout 20 scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [[ -z $(timeout 10 squeue -h -o '%A' 2>/dev/null || true) ]] && break
                sleep 1
            done
        fi
    fi
    local d pid i
    for d in "${DAEMONS[@]}"; do
        pid=$(daemon_pid "$d") || { rm -f "$(pidfile "$d")"; continue; }
        as_root kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        if daemon_pid "$d" >/dev/null; then
            log "$d (pid $pid) ignored SIGTERM: SIGKILL"
            as_root kill -KILL "$pid" 2>/dev/null || true
        fi
        as_root rm -f "$(pidfile "$d")"
        log "$d stopped (pid $pid)"
    done
}

cmd_status() {
    local d pid ok=0
    for d in munged slurmctld slurmd; do
        if pid=$(daemon_pid "$d"); then
            echo "$d: running (pid $pid)"
        else
            echo "$d: stopped"
            ok=3
        fi
    done
    echo "SLURM_CONF=$CONF"
    if [[ $ok -eq 0 ]]; then
        export SLURM_CONF=$CONF
        timeout 20 sinfo || ok=3
        timeout 20 squeue || ok=3
    fi
    return $ok
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    config) render_config ;;
    *)
        echo "usage: $0 start|stop|status|config   (folder: $DIR)" >&2
        exit 2
        ;;
esac
