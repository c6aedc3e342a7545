#!/usr/bin/env bash
# Submit many nights of survey-qa to SLURM, each night one hpc/night.sbatch job.
#
#   hpc/nights.sh [options] NIGHT... [-- survey-qa options]
#   hpc/nights.sh [options] --file nights.txt [-- survey-qa options]
#
# Options:
#   --chain              one job per night, each starting after the previous one ended
#                        (--dependency=afterany); default: one job array over the nights
#   --after-ok           with --chain: start a night only if the previous one succeeded
#   --max-parallel N     array: at most N nights at once (--array=...%N)
#   --sbatch-arg ARG     pass ARG to sbatch (repeat), e.g. --sbatch-arg=--cpus-per-task=32
#   --list-dir DIR       where the array's list of nights is written (default
#                        $SURVEY_QA_NIGHTS_DIR or ./.survey-qa); compute nodes must read it
#
# Prints one line per night on stdout: "NIGHT<TAB>JOBID" (JOBID_INDEX for an array).
# Nights are YYYY-MM-DD; a file holds one per line ('#' comments and blank lines allowed).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NIGHT_SCRIPT=${SURVEY_QA_NIGHT_SCRIPT:-$HERE/night.sbatch}

die() { echo "nights.sh: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }

chain=0
dependency=afterany
max_parallel=
list_dir=${SURVEY_QA_NIGHTS_DIR:-$PWD/.survey-qa}
sbatch_args=()
nights=()
extra=()

while [[ $# -gt 0 ]]; do
    case $1 in
        --chain) chain=1 ;;
        --after-ok) dependency=afterok ;;
        --max-parallel) [[ $# -ge 2 ]] || die "$1 needs a value"; max_parallel=$2; shift ;;
        --max-parallel=*) max_parallel=${1#*=} ;;
        --sbatch-arg) [[ $# -ge 2 ]] || die "$1 needs a value"; sbatch_args+=("$2"); shift ;;
        --sbatch-arg=*) sbatch_args+=("${1#*=}") ;;
        --list-dir) [[ $# -ge 2 ]] || die "$1 needs a value"; list_dir=$2; shift ;;
        --list-dir=*) list_dir=${1#*=} ;;
        --file | --file=*)
            if [[ $1 == --file ]]; then
                [[ $# -ge 2 ]] || die "--file needs a file"; file=$2; shift
            else
                file=${1#*=}
            fi
            [[ -r $file ]] || die "cannot read $file"
            while read -r line || [[ -n $line ]]; do
                line=${line%%#*}
                line=${line//[[:space:]]/}
                [[ -n $line ]] && nights+=("$line")
            done <"$file"
            ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) usage ;;
        -*) die "unknown option $1 (survey-qa options go after --)" ;;
        *) nights+=("$1") ;;
    esac
    shift
done

[[ ${#nights[@]} -gt 0 ]] || die "no nights given (NIGHT... or --file FILE); see --help"
for n in "${nights[@]}"; do
    [[ $n =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] || die "'$n' is not a night YYYY-MM-DD"
done
[[ -z $max_parallel || $max_parallel =~ ^[1-9][0-9]*$ ]] || die "--max-parallel must be a positive integer"
[[ -r $NIGHT_SCRIPT ]] || die "cannot read $NIGHT_SCRIPT"

# sbatch --parsable prints "JOBID" or "JOBID;CLUSTER".
submit() {
    local out
    out=$(sbatch --parsable "$@") || die "sbatch failed: sbatch $*"
    echo "${out%%;*}"
}

if [[ $chain -eq 1 ]]; then
    previous=
    for n in "${nights[@]}"; do
        dep=()
        [[ -n $previous ]] && dep=("--dependency=$dependency:$previous")
        previous=$(submit "${dep[@]}" --job-name="survey-qa-$n" "${sbatch_args[@]}" \
            "$NIGHT_SCRIPT" "$n" "${extra[@]}")
        printf '%s\t%s\n' "$n" "$previous"
    done
    exit 0
fi

mkdir -p "$list_dir"
list=$(mktemp "$list_dir/nights-XXXXXXXX.txt")
printf '%s\n' "${nights[@]}" >"$list"
list=$(cd "$(dirname "$list")" && pwd)/$(basename "$list")
range="0-$((${#nights[@]} - 1))${max_parallel:+%$max_parallel}"
job=$(submit --array="$range" --output="survey-qa-night-%A_%a.out" "${sbatch_args[@]}" \
    "$NIGHT_SCRIPT" --nights-file "$list" "${extra[@]}")
echo "nights.sh: array job $job over ${#nights[@]} night(s), list $list" >&2
for i in "${!nights[@]}"; do
    printf '%s\t%s_%s\n' "${nights[$i]}" "$job" "$i"
done
