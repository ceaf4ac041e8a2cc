#!/usr/bin/env bash
# Queue the paper's ablation grids as DVC experiments, one per variant (the reference value, that of
# params.yaml, is the baseline itself). The grids are defined once, in hdkd/report/ablations.py (ABLATIONS).
#
#   scripts/queue_ablations.sh                    # every grid
#   scripts/queue_ablations.sh lambda alpha_tau   # some of: lambda alpha_tau stages block stem_stride
#   python -m pipeline.report --queue-ablations --dry-run   # the commands, without queueing
#   dvc queue start -j 2                          # run them (in .dvc/tmp/exps); `dvc queue status`, `dvc queue logs <name>`
#   python -m pipeline.report --collect-ablations && dvc repro report    # ablation tables, data-efficiency figure
#
# Queued experiments run the committed code: commit (and `dvc repro` the baseline) first.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pipeline.report --queue-ablations "$@"
dvc queue status
