"""Airflow DAG: launch the Dataflow flex template (deploy/dataflow/build.sh) every night.

Each run is ``--mode incremental``: only images that are new or changed since the last run are
embedded, and the chunks a failed run did not commit are done now. ``max_active_runs=1`` keeps
two runs from writing the same table at once.

Set the Airflow Variables ``featurebeam_project``, ``featurebeam_bucket``, ``featurebeam_image``,
``featurebeam_input``, ``featurebeam_output`` and ``featurebeam_weights``.
Needs ``apache-airflow-providers-google``.
"""

from __future__ import annotations

import datetime

from airflow import DAG
from airflow.models import Variable
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator

REGION = "us-central1"
GPU = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"

with DAG(
    dag_id="featurebeam_nightly_embedding",
    schedule="15 2 * * *",
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": datetime.timedelta(minutes=10)},
    tags=["featurebeam"],
) as dag:
    bucket = Variable.get("featurebeam_bucket", default_var="my-bucket")
    DataflowStartFlexTemplateOperator(
        task_id="embed_new_images",
        project_id=Variable.get("featurebeam_project", default_var="my-project"),
        location=REGION,
        wait_until_finished=True,
        body={
            "launchParameter": {
                "jobName": "featurebeam-{{ ds_nodash }}",
                "containerSpecGcsPath": f"gs://{bucket}/templates/featurebeam-extract.json",
                "parameters": {
                    "input": Variable.get("featurebeam_input", default_var=""),
                    "output": Variable.get("featurebeam_output", default_var=""),
                    "backbone": "resnet50",
                    "weights": Variable.get("featurebeam_weights", default_var=""),
                    "mode": "incremental",
                    "batch_size": "128",
                    "chunk_size": "2000",
                    "decode_threads": "auto",
                    "cache_dir": "/tmp/featurebeam-weights",
                    "sdk_container_image": Variable.get("featurebeam_image", default_var=""),
                    "number_of_worker_harness_threads": "4",
                },
                "environment": {
                    "tempLocation": f"gs://{bucket}/tmp",
                    "stagingLocation": f"gs://{bucket}/staging",
                    "machineType": "n1-standard-8",
                    "maxWorkers": 8,
                    "additionalExperiments": ["use_runner_v2", "no_use_multiple_sdk_containers"],
                    "additionalPipelineOptions": [f"dataflow_service_options={GPU}"],
                },
            }
        },
    )
