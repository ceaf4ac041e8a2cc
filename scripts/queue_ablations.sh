#!/usr/bin/env bash
# Queue the paper's ablation grids as DVC experiments, one per value (the reference value, that of
# params.yaml, is the baseline itself). Small values for the embedded default; edit for real data.
#
#   scripts/queue_ablations.sh                 # every grid
#   scripts/queue_ablations.sh lambda alpha    # some of: lambda alpha tau stages block stem_stride train_fraction
#   dvc queue start -j 2                       # run them (in .dvc/tmp/exps); `dvc queue status`, `dvc queue logs <name>`
#   python -m pipeline.report --collect-ablations && dvc repro report    # ablation tables, data-efficiency figure
#
# Queued experiments run the committed code: commit (and `dvc repro` the baseline) first.
set -euo pipefail
cd "$(dirname "$0")/.."

queue() {  # queue NAME KEY=VALUE: one experiment named abl-NAME
  dvc exp run --queue -n "abl-$1" -S "$2"
}

GRIDS=(lambda alpha tau stages block stem_stride train_fraction)

grid() {
  case $1 in
    lambda)         queue lambda-0 distill.lambda=0;        queue lambda-1 distill.lambda=1 ;;       # ref. 10
    alpha)          queue alpha-0.1 distill.alpha=0.1;      queue alpha-0.9 distill.alpha=0.9 ;;     # ref. 0.5
    tau)            queue tau-2 distill.tau=2;              queue tau-4 distill.tau=4 ;;             # ref. 1
    stages)         queue stages-3 'distill.stages=[3]';    queue stages-2-3 'distill.stages=[2,3]'
                    queue stages-1 'distill.stages=[1]' ;;                                           # ref. [1,2,3]
    block)          queue block-mbconv model.block=mbconv ;;                                         # ref. mbcsa
    stem_stride)    queue stem-stride-4 model.stem_stride=4 ;;                                       # ref. 2
    train_fraction) queue train-0.25 data.train_fraction=0.25; queue train-0.5 data.train_fraction=0.5 ;;  # ref. 1
  esac
}

chosen=("${@:-${GRIDS[@]}}")
for g in "${chosen[@]}"; do  # check every name before queueing anything
  [[ " ${GRIDS[*]} " == *" $g "* ]] || { echo "unknown grid '$g' (one of: ${GRIDS[*]})" >&2; exit 2; }
done
for g in "${chosen[@]}"; do grid "$g"; done
dvc queue status
