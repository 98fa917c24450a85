#!/usr/bin/env bash
# Build and push the worker/launcher image, then write the flex-template spec to the bucket.
#
#   PROJECT=my-project BUCKET=my-bucket IMAGE=us-central1-docker.pkg.dev/my-project/ml/featurebeam:0.2.0 \
#   deploy/dataflow/build.sh
set -euo pipefail
: "${BUCKET:?set BUCKET}" "${IMAGE:?set IMAGE}"
cd "$(dirname "$0")/../.."
docker build -f deploy/dataflow/Dockerfile -t "$IMAGE" .
docker push "$IMAGE"
gcloud dataflow flex-template build "gs://$BUCKET/templates/featurebeam-extract.json" \
  --image "$IMAGE" --sdk-language PYTHON --metadata-file deploy/dataflow/metadata.json
echo "template: gs://$BUCKET/templates/featurebeam-extract.json"
