#!/bin/bash
# Submit round ${ROUND}: the token store, then the cache job array, then training once every array task has succeeded.
set -euo pipefail
prepare_job=$(sbatch --parsable "${OUT_DIR}/prepare.sbatch")
cache_job=$(sbatch --parsable --dependency=afterok:"$prepare_job" "${OUT_DIR}/cache_array.sbatch")
train_job=$(sbatch --parsable --dependency=afterok:"$cache_job" "${OUT_DIR}/train.sbatch")
echo "round ${ROUND}: prepare $prepare_job, cache array $cache_job, train $train_job"
