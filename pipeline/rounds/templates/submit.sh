#!/bin/bash
# Submit round ${ROUND}: the cache job array, then training once every array task has succeeded.
set -euo pipefail
cache_job=$(sbatch --parsable "${OUT_DIR}/cache_array.sbatch")
train_job=$(sbatch --parsable --dependency=afterok:"$cache_job" "${OUT_DIR}/train.sbatch")
echo "round ${ROUND}: cache array $cache_job, train $train_job"
