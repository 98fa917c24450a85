#!/usr/bin/env bash
# Launch the flex template built by build.sh (no checkout or Python needed on this machine).
#
#   PROJECT=my-project BUCKET=my-bucket IMAGE=... INPUT=gs://... OUTPUT=gs://... WEIGHTS=gs://... \
#   deploy/dataflow/launch_template.sh          # add --dry-run to print the command's arguments only
#
# The launcher runs deploy/dataflow/main.py, which plans, writes the plan and the job, and exits
# without waiting; the workers renew the table's lease as they embed and give it back at the end.
# LEASE_EXPIRY must cover the time from the launch to the first worker's heartbeat (a GPU VM,
# its driver and this image take minutes), or a run launched meanwhile takes the table over.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${BUCKET:?set BUCKET}" "${IMAGE:?set IMAGE}"
: "${INPUT:?set INPUT}" "${OUTPUT:?set OUTPUT}" "${WEIGHTS:?set WEIGHTS}"
REGION=${REGION:-us-central1}
BACKBONE=${BACKBONE:-resnet50}
GPU_TYPE=${GPU_TYPE:-nvidia-tesla-t4}
PRUNE=${PRUNE:-false}                  # true: remove the rows of images no longer listed
LEASE_EXPIRY=${LEASE_EXPIRY:-1800}
DISK_SIZE_GB=${DISK_SIZE_GB:-50}       # per worker: the image and the weights cache
LAUNCHER_MACHINE_TYPE=${LAUNCHER_MACHINE_TYPE:-n1-standard-2}  # lists INPUT and plans
# "^~^" makes "~" the separator, because the accelerator option itself holds ";" and ",".
PARAMS="^~^input=$INPUT~output=$OUTPUT~backbone=$BACKBONE~weights=$WEIGHTS~mode=incremental"
PARAMS+="~prune=$PRUNE~lease_expiry=$LEASE_EXPIRY"
PARAMS+="~batch_size=128~chunk_size=2000~decode_threads=auto~cache_dir=/tmp/featurebeam-weights"
PARAMS+="~sdk_container_image=$IMAGE~number_of_worker_harness_threads=4"
PARAMS+="~dataflow_service_options=worker_accelerator=type:$GPU_TYPE;count:1;install-nvidia-driver"
ARGS=(
  dataflow flex-template run "featurebeam-$(date -u +%Y%m%d-%H%M%S)"
  --project "$PROJECT" --region "$REGION"
  --template-file-gcs-location "gs://$BUCKET/templates/featurebeam-extract.json"
  --temp-location "gs://$BUCKET/tmp" --staging-location "gs://$BUCKET/staging"
  --worker-machine-type "${MACHINE_TYPE:-n1-standard-8}" --max-workers "${MAX_WORKERS:-8}"
  --disk-size-gb "$DISK_SIZE_GB" --launcher-machine-type "$LAUNCHER_MACHINE_TYPE"
  --additional-experiments use_runner_v2,no_use_multiple_sdk_containers
  --parameters "$PARAMS"
)
if [[ "${1:-}" == "--dry-run" ]]; then
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
exec gcloud "${ARGS[@]}"
