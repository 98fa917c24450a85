#!/usr/bin/env bash
# Cloud Scheduler -> Dataflow flex template, nightly, without Airflow.
#
#   PROJECT=... BUCKET=... IMAGE=... INPUT=gs://... OUTPUT=gs://... WEIGHTS=gs://... \
#   SERVICE_ACCOUNT=scheduler@PROJECT.iam.gserviceaccount.com deploy/schedule/cloud_scheduler.sh
#   ... deploy/schedule/cloud_scheduler.sh --dry-run    # print the launch request only
#
# Every template parameter is declared in deploy/dataflow/metadata.json; PRUNE=false keeps the
# rows of images deleted from INPUT.
# The service account needs roles/dataflow.developer and to act as the Dataflow worker account.
set -euo pipefail
: "${PROJECT:?}" "${BUCKET:?}" "${IMAGE:?}" "${INPUT:?}" "${OUTPUT:?}" "${WEIGHTS:?}" "${SERVICE_ACCOUNT:?}"
REGION=${REGION:-us-central1}
GPU="worker_accelerator=type:${GPU_TYPE:-nvidia-tesla-t4};count:1;install-nvidia-driver"
BODY=$(cat <<JSON
{"launchParameter": {
  "jobName": "featurebeam-nightly",
  "containerSpecGcsPath": "gs://$BUCKET/templates/featurebeam-extract.json",
  "parameters": {"input": "$INPUT", "output": "$OUTPUT", "backbone": "${BACKBONE:-resnet50}",
                 "weights": "$WEIGHTS", "mode": "incremental", "prune": "${PRUNE:-true}", "batch_size": "128",
                 "chunk_size": "2000", "decode_threads": "auto", "cache_dir": "/tmp/featurebeam-weights",
                 "sdk_container_image": "$IMAGE", "number_of_worker_harness_threads": "4"},
  "environment": {"tempLocation": "gs://$BUCKET/tmp", "machineType": "n1-standard-8", "maxWorkers": 8,
                  "additionalExperiments": ["use_runner_v2", "no_use_multiple_sdk_containers"],
                  "additionalPipelineOptions": ["dataflow_service_options=$GPU"]}}}
JSON
)
if [[ "${1:-}" == "--dry-run" ]]; then
  printf '%s\n' "$BODY"
  exit 0
fi
gcloud scheduler jobs create http featurebeam-nightly \
  --project "$PROJECT" --location "$REGION" --schedule "15 2 * * *" --time-zone "Etc/UTC" \
  --uri "https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch" \
  --http-method POST --headers "Content-Type=application/json" --message-body "$BODY" \
  --oauth-service-account-email "$SERVICE_ACCOUNT"
