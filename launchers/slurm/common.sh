# Sourced by launchers/slurm/<stage>.sbatch: run one stage under srun, forward the preemption
# signals to it, and requeue the job when the stage stopped after writing a checkpoint.
#
# User values (CONFIG, RUN_DIR, overrides) only ever travel as quoted "$@" arguments: nothing
# here pastes them into shell code. Environment:
#   TESSERA_REPO          the checkout to run (default: the directory sbatch was called from)
#   TESSERA_PYTHON        the Python with tessera's requirements (default: python3 on PATH)
#   TESSERA_SETUP         a file sourced first (module load ..., conda activate ...)
#   TESSERA_MAX_REQUEUES  requeue at most this many times (default 5); then the job fails

tessera_stage() {
    local stage=$1
    shift
    if (( $# < 2 )); then
        echo "usage: sbatch launchers/slurm/$stage.sbatch CONFIG RUN_DIR [key=value ...]" >&2
        exit 2
    fi
    local config=$1 run_dir=$2
    shift 2
    # The run directory ends up in paths, logs and events.jsonl lines: a control character (a
    # newline above all) in its name would split them, so such a name is refused up front.
    if [[ $run_dir == *[[:cntrl:]]* ]]; then
        printf 'tessera: error: RUN_DIR %q: the name contains a control character; choose another name\n' \
            "$run_dir" >&2
        exit 2
    fi
    local repo=${TESSERA_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    if [[ -n ${TESSERA_SETUP:-} ]]; then
        # shellcheck disable=SC1090  # the user's own setup file
        source "$TESSERA_SETUP"
    fi
    local py=${TESSERA_PYTHON:-python3}
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    cd "$repo" || exit 2
    local job=${SLURM_JOB_ID:-}
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; fi
    echo "[tessera] $stage: job $job on $(hostname -s), restart ${SLURM_RESTART_COUNT:-0}"

    # One rank per task (one per GPU): srun starts them; pipeline/runtime/dist.py reads SLURM_PROCID,
    # SLURM_NTASKS, SLURM_LOCALID and the first host of SLURM_JOB_NODELIST.
    srun --kill-on-bad-exit=1 "$py" -m pipeline.cli stage "$stage" "$config" --run-dir "$run_dir" "$@" &
    local pid=$! signalled=""
    # --signal=B:USR1@N reaches only this shell: pass it to the ranks (srun forwards it), which
    # checkpoint and exit with code 3.
    trap 'signalled=USR1; kill -USR1 "$pid" 2>/dev/null' USR1
    trap 'signalled=TERM; kill -TERM "$pid" 2>/dev/null' TERM
    local rc=0
    while :; do  # a trapped signal interrupts `wait`: wait again until srun has really exited
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    if (( rc == 0 )); then return 0; fi
    if (( rc != 3 )) && [[ -z $signalled ]]; then
        echo "[tessera] $stage: failed with exit code $rc (see $run_dir/$stage/log.txt)" >&2
        exit "$rc"
    fi
    local restarts=${SLURM_RESTART_COUNT:-0} max=${TESSERA_MAX_REQUEUES:-5}
    mkdir -p "$run_dir/slurm"
    if (( restarts >= max )); then
        echo "[tessera] $stage: preempted (exit $rc) but not requeued: $restarts restarts already (max $max)" >&2
        printf '{"event": "not requeued", "job": "%s", "restarts": %d, "stage": "%s", "time": "%s"}\n' \
            "$job" "$restarts" "$stage" "$(date +%Y-%m-%dT%H:%M:%S)" >> "$run_dir/slurm/events.jsonl"
        exit 3
    fi
    echo "[tessera] $stage: checkpoint written (exit $rc${signalled:+, $signalled}); requeueing job $job" \
         "(restart $((restarts + 1)) of at most $max)"
    printf '{"event": "requeue", "job": "%s", "restarts": %d, "stage": "%s", "time": "%s"}\n' \
        "$job" "$((restarts + 1))" "$stage" "$(date +%Y-%m-%dT%H:%M:%S)" >> "$run_dir/slurm/events.jsonl"
    # Fails harmlessly when SLURM is requeueing the job already (`scontrol requeue` by hand).
    scontrol requeue "$job" || true
    exit 0
}
