#!/usr/bin/env bash
# Submit the extraction job to Dataflow with GPU workers, from a checkout of this repository.
#
#   PROJECT=my-project BUCKET=my-bucket IMAGE=us-central1-docker.pkg.dev/my-project/ml/featurebeam:0.2.0 \
#   INPUT=gs://my-bucket/images OUTPUT=gs://my-bucket/features/resnet50 \
#   WEIGHTS=gs://my-bucket/weights/resnet50-imagenet.keras \
#   deploy/dataflow/run.sh            # add --dry-run to print the command's arguments only
#
# IMAGE is built by deploy/dataflow/build.sh; WEIGHTS by `python -m pipeline.stage_weights`.
# The launching machine lists INPUT and plans the run, so it needs read access to the bucket.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${BUCKET:?set BUCKET}" "${IMAGE:?set IMAGE}"
: "${INPUT:?set INPUT}" "${OUTPUT:?set OUTPUT}" "${WEIGHTS:?set WEIGHTS}"
REGION=${REGION:-us-central1}
BACKBONE=${BACKBONE:-resnet50}
GPU_TYPE=${GPU_TYPE:-nvidia-tesla-t4}
MACHINE_TYPE=${MACHINE_TYPE:-n1-standard-8}
MAX_WORKERS=${MAX_WORKERS:-8}
MODE=${MODE:-incremental}   # incremental on an empty OUTPUT is a full run; reruns add what is new

# worker_accelerator: one GPU per VM, driver installed by Dataflow.
# no_use_multiple_sdk_containers: one SDK process per VM, so one copy of the model in GPU memory,
# fed by --number_of_worker_harness_threads threads (each embeds its own chunk).

ARGS=(
  -m pipeline.extract
  --input "$INPUT" --output "$OUTPUT" --mode "$MODE"
  --backbone "$BACKBONE" --weights "$WEIGHTS" --cache-dir /tmp/featurebeam-weights
  --batch-size 128 --chunk-size 2000 --decode-threads auto
  --runner DataflowRunner --project "$PROJECT" --region "$REGION"
  --temp_location "gs://$BUCKET/tmp" --staging_location "gs://$BUCKET/staging"
  --sdk_container_image "$IMAGE" --sdk_location container
  --machine_type "$MACHINE_TYPE" --max_num_workers "$MAX_WORKERS" --disk_size_gb 50
  --dataflow_service_options "worker_accelerator=type:$GPU_TYPE;count:1;install-nvidia-driver"
  --experiments use_runner_v2
  --experiments no_use_multiple_sdk_containers
  --number_of_worker_harness_threads 4
)
# The workers unpickle what this Python pickled: it must be the image's Python (major.minor).
PYTHON=${PYTHON:-python}
IMAGE_PYTHON=${IMAGE_PYTHON:-$(sed -n 's/^ARG PY_VERSION=//p' "$(dirname "$0")/Dockerfile")}
HERE_PYTHON=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ "$HERE_PYTHON" != "$IMAGE_PYTHON" ]]; then
  echo "error: $PYTHON is Python $HERE_PYTHON but the image's is $IMAGE_PYTHON; submit with a" \
    "Python $IMAGE_PYTHON (set PYTHON=...), or set IMAGE_PYTHON if the image was built otherwise" >&2
  exit 2
fi
if [[ "${1:-}" == "--dry-run" ]]; then
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
exec "$PYTHON" "${ARGS[@]}"
