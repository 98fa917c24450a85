"""Airflow DAG (Airflow 3): embed the new and changed images every night, then refresh what reads
the table.

One DAG, ``featurebeam_nightly_embedding``, with two targets chosen by the environment variable
``FEATUREBEAM_AIRFLOW_TARGET`` of the scheduler and workers:

- ``local`` (the default): the ``embed`` task runs our command line, ``featurebeam extract --mode
  incremental --prune``, in its own environment (Airflow and this project never share one), on
  the in-process runner or on the Dask cluster at the Variable ``featurebeam_dask_address``. Then
  ``index`` (``featurebeam index``: the search index ``featurebeam serve`` reads, updated in
  place), ``neighbors`` (``featurebeam neighbors``) and ``report`` (``featurebeam report``) refresh
  their outputs, each one skipped when its Variable is empty.
- ``dataflow``: the ``embed`` task launches the flex template (deploy/dataflow/build.sh) with
  ``DataflowStartFlexTemplateOperator`` and waits for the job. Needs
  ``apache-airflow-providers-google``.

A failed or killed try leaves the table consistent (only whole shards; a stopped run gives its lease
back, a killed one's lease is taken over at once on the same host), and the next try, ``--mode
incremental``, embeds just the chunks that were not committed. ``max_active_runs=1`` keeps two runs
from writing one table; the table's lease refuses a second writer anyway.

Airflow Variables are read by templates when a task runs, never when the file is parsed:

- ``featurebeam_input``, ``featurebeam_output`` (required); ``featurebeam_backbone`` (default
  ``mobilenet_v2``), ``featurebeam_weights`` (default ``imagenet``; on Dataflow a staged gs:// file),
  ``featurebeam_prune`` (``true``/``false``, default ``true``), ``featurebeam_extra_args`` (more
  ``featurebeam extract`` flags, local target);
- local: ``featurebeam_command`` (default ``featurebeam`` on PATH), ``featurebeam_dask_address``
  (``HOST:PORT``; empty: in-process), ``featurebeam_index`` (the search index's folder, on the
  worker's local disk; empty: no index), ``featurebeam_neighbors`` (the neighbour tables' folder;
  empty: no refresh), ``featurebeam_report`` (the HTML file; empty: no report);
- dataflow: ``featurebeam_project``, ``featurebeam_region`` (default ``us-central1``),
  ``featurebeam_bucket``, ``featurebeam_image``.

Environment variables (read at parse time, they shape the DAG): ``FEATUREBEAM_AIRFLOW_TARGET``,
``FEATUREBEAM_RETRIES`` (default 2), ``FEATUREBEAM_RETRY_DELAY_S`` (default 600),
``FEATUREBEAM_TIMEOUT_S`` (the embed task's execution timeout, default 6 hours).
"""

from __future__ import annotations

import datetime
import os

from airflow.sdk import DAG


def var(name: str, default: str = "") -> str:
    """A template that reads Airflow Variable ``featurebeam_NAME`` when the task runs."""
    return "{{ var.value.get('featurebeam_" + name + "', '" + default + "') }}"


# The flex template's parameters (names and forms: deploy/dataflow/metadata.json; checked by
# tests/test_airflow.py without Airflow). Values are strings, as the launch API takes them.
DATAFLOW_PARAMETERS = {
    "input": "{{ var.value.get('featurebeam_input') }}",
    "output": "{{ var.value.get('featurebeam_output') }}",
    "backbone": "{{ var.value.get('featurebeam_backbone', 'resnet50') }}",
    "weights": "{{ var.value.get('featurebeam_weights') }}",
    "mode": "incremental",
    "prune": "{{ var.value.get('featurebeam_prune', 'true') }}",
    "batch_size": "128",
    "chunk_size": "2000",
    "decode_threads": "auto",
    "cache_dir": "/tmp/featurebeam-weights",
    # Beam/Dataflow pipeline options, which flex templates take as parameters too.
    "sdk_container_image": "{{ var.value.get('featurebeam_image') }}",
    "number_of_worker_harness_threads": "4",
}
GPU = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"

# The local target's commands. Values reach bash as environment variables (quoted there), not
# pasted into the command line.
ENV = {
    "FB": var("command", "featurebeam"),
    "FB_INPUT": var("input"),
    "FB_OUTPUT": var("output"),
    "FB_BACKBONE": var("backbone", "mobilenet_v2"),
    "FB_WEIGHTS": var("weights", "imagenet"),
    "FB_PRUNE": var("prune", "true"),
    "FB_EXTRA": var("extra_args"),
    "FB_DASK": var("dask_address"),
    "FB_INDEX": var("index"),
    "FB_NEIGHBORS": var("neighbors"),
    "FB_REPORT": var("report"),
}
EMBED = (
    'set -eu; : "${FB_INPUT:?Variable featurebeam_input}" "${FB_OUTPUT:?Variable featurebeam_output}"\n'
    'prune=; [ "$FB_PRUNE" = true ] && prune=--prune\n'
    'exec "$FB" extract --input "$FB_INPUT" --output "$FB_OUTPUT" --mode incremental $prune'
    ' --backbone "$FB_BACKBONE" --weights "$FB_WEIGHTS"'
    ' ${FB_DASK:+--runner dask --dask_client_address "$FB_DASK"} $FB_EXTRA'
)
# Exit status 99 marks a BashOperator task skipped: an output not asked for.
INDEX = (
    '[ -n "$FB_INDEX" ] || { echo "no Variable featurebeam_index: skipped"; exit 99; }\n'
    'exec "$FB" index --features "$FB_OUTPUT" --index "$FB_INDEX"'
)
NEIGHBORS = (
    '[ -n "$FB_NEIGHBORS" ] || { echo "no Variable featurebeam_neighbors: skipped"; exit 99; }\n'
    'exec "$FB" neighbors --features "$FB_OUTPUT" --output "$FB_NEIGHBORS" --overwrite'
)
REPORT = (
    '[ -n "$FB_REPORT" ] || { echo "no Variable featurebeam_report: skipped"; exit 99; }\n'
    'exec "$FB" report --features "$FB_OUTPUT" --output "$FB_REPORT" --overwrite'
    ' ${FB_NEIGHBORS:+--neighbors "$FB_NEIGHBORS"}'
)

TARGET = os.environ.get("FEATUREBEAM_AIRFLOW_TARGET", "local")
if TARGET not in ("local", "dataflow"):
    raise ValueError(f"FEATUREBEAM_AIRFLOW_TARGET={TARGET!r}: expected local or dataflow")

with DAG(
    dag_id="featurebeam_nightly_embedding",
    schedule="15 2 * * *",
    start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": int(os.environ.get("FEATUREBEAM_RETRIES", "2")),
        "retry_delay": datetime.timedelta(
            seconds=float(os.environ.get("FEATUREBEAM_RETRY_DELAY_S", "600"))
        ),
    },
    tags=["featurebeam"],
) as dag:
    timeout = datetime.timedelta(seconds=float(os.environ.get("FEATUREBEAM_TIMEOUT_S", "21600")))
    if TARGET == "local":
        from airflow.providers.standard.operators.bash import BashOperator

        def command(task_id: str, bash: str, **kwargs) -> BashOperator:
            return BashOperator(
                task_id=task_id, bash_command=bash, env=ENV, append_env=True, **kwargs
            )

        embed = command("embed", EMBED, execution_timeout=timeout)
        neighbors = command("neighbors", NEIGHBORS)
        # Runs when neighbours were skipped (not asked for), not when they failed.
        report = command("report", REPORT, trigger_rule="none_failed")
        embed >> [command("index", INDEX), neighbors]
        neighbors >> report
    else:
        from airflow.providers.google.cloud.operators.dataflow import (
            DataflowStartFlexTemplateOperator,
        )

        bucket = var("bucket")
        DataflowStartFlexTemplateOperator(
            task_id="embed",
            project_id=var("project"),
            location=var("region", "us-central1"),
            wait_until_finished=True,
            execution_timeout=timeout,
            body={
                "launchParameter": {
                    "jobName": "featurebeam-{{ ds_nodash }}-{{ ti.try_number }}",
                    "containerSpecGcsPath": f"gs://{bucket}/templates/featurebeam-extract.json",
                    "parameters": DATAFLOW_PARAMETERS,
                    "environment": {
                        "tempLocation": f"gs://{bucket}/tmp",
                        "stagingLocation": f"gs://{bucket}/staging",
                        "machineType": "n1-standard-8",
                        "maxWorkers": 8,
                        "additionalExperiments": [
                            "use_runner_v2",
                            "no_use_multiple_sdk_containers",
                        ],
                        "additionalPipelineOptions": [f"dataflow_service_options={GPU}"],
                    },
                }
            },
        )
