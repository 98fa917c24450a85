#!/usr/bin/env bash
# Submit the extraction job to a Flink cluster with Beam's portable Flink runner.
#
#   kubectl port-forward svc/featurebeam-rest 8081 &     # the operator's REST service
#   INPUT=gs://my-bucket/images OUTPUT=gs://my-bucket/features/resnet50 \
#   WEIGHTS=gs://my-bucket/weights/resnet50-imagenet.keras deploy/flink/run.sh   # --dry-run: print only
#
# The submitting machine needs this package's Python, read access to INPUT (it plans the run),
# and Flink's REST port (FLINK_MASTER). No Java: with --flink_submit_uber_jar Beam's Python
# FlinkRunner takes Beam's Flink job-server jar for --flink_version, adds the pipeline to a copy
# of it and uploads that to Flink's REST API, which runs it. Beam downloads that jar from Maven
# Central on first use (cached under ~/.apache_beam/cache/jars); offline, point FLINK_JOB_SERVER_JAR
# at a local copy. Workers read the plan and write the table under OUTPUT and read WEIGHTS, so
# all three must be shared storage (gs://, s3://, or a volume mounted in every TaskManager pod),
# and the sidecar needs credentials for it (flink-deployment.yaml).
set -euo pipefail
: "${INPUT:?set INPUT}" "${OUTPUT:?set OUTPUT}" "${WEIGHTS:?set WEIGHTS}"
FLINK_MASTER=${FLINK_MASTER:-localhost:8081}
PARALLELISM=${PARALLELISM:-8}   # TaskManagers x slots
BACKBONE=${BACKBONE:-resnet50}
# Two task slots per TaskManager = two SDK processes per sidecar: --intra-op-threads 4 gives each
# half of the sidecar's 8 cores.

ARGS=(
  -m pipeline.extract
  --input "$INPUT" --output "$OUTPUT" --mode "${MODE:-incremental}"
  --backbone "$BACKBONE" --weights "$WEIGHTS" --cache-dir /tmp/featurebeam-weights
  --batch-size 32 --chunk-size 1000
  --intra-op-threads 4
  --runner FlinkRunner --flink_master "$FLINK_MASTER" --flink_version 1.20
  --flink_submit_uber_jar --parallelism "$PARALLELISM"
  --environment_type EXTERNAL --environment_config localhost:50000
)
if [[ -n "${FLINK_JOB_SERVER_JAR:-}" ]]; then
  ARGS+=(--flink_job_server_jar "$FLINK_JOB_SERVER_JAR")
fi
if [[ "${1:-}" == "--dry-run" ]]; then
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
exec python "${ARGS[@]}"
