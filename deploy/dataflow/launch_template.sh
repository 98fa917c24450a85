#!/usr/bin/env bash
# Launch the flex template built by build.sh (no checkout or Python needed on this machine).
#
#   PROJECT=my-project BUCKET=my-bucket IMAGE=... INPUT=gs://... OUTPUT=gs://... WEIGHTS=gs://... \
#   deploy/dataflow/launch_template.sh
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${BUCKET:?set BUCKET}" "${IMAGE:?set IMAGE}"
: "${INPUT:?set INPUT}" "${OUTPUT:?set OUTPUT}" "${WEIGHTS:?set WEIGHTS}"
REGION=${REGION:-us-central1}
BACKBONE=${BACKBONE:-resnet50}
GPU_TYPE=${GPU_TYPE:-nvidia-tesla-t4}
# "^~^" makes "~" the separator, because the accelerator option itself holds ";" and ",".
PARAMS="^~^input=$INPUT~output=$OUTPUT~backbone=$BACKBONE~weights=$WEIGHTS~mode=incremental"
PARAMS+="~batch_size=128~chunk_size=2000~decode_threads=auto~cache_dir=/tmp/featurebeam-weights"
PARAMS+="~sdk_container_image=$IMAGE~number_of_worker_harness_threads=4"
PARAMS+="~dataflow_service_options=worker_accelerator=type:$GPU_TYPE;count:1;install-nvidia-driver"
gcloud dataflow flex-template run "featurebeam-$(date -u +%Y%m%d-%H%M%S)" \
  --project "$PROJECT" --region "$REGION" \
  --template-file-gcs-location "gs://$BUCKET/templates/featurebeam-extract.json" \
  --temp-location "gs://$BUCKET/tmp" --staging-location "gs://$BUCKET/staging" \
  --worker-machine-type "${MACHINE_TYPE:-n1-standard-8}" --max-workers "${MAX_WORKERS:-8}" \
  --additional-experiments use_runner_v2,no_use_multiple_sdk_containers \
  --parameters "$PARAMS"
