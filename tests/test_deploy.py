"""deploy/: the Dataflow and Flink launch scripts build a valid job offline, without submitting.

Each script prints the exact arguments it would run (``--dry-run``). From those we parse our flags
and Beam's, validate the pipeline options with Beam's own validator for that runner, plan and build
the real graph, translate it to the runner API proto, and read it back (which unpickles every
DoFn). For Dataflow, Beam's ``--dry_run`` test option goes further: the DataflowRunner performs its
whole job translation and stops just before the API call.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions
from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.transforms import environments
from apache_beam.utils import proto_utils
from test_gcs import gcs_emulator  # noqa: F401  (the fixture)

from pipeline import launch
from pipeline.config import parse_args
from pipeline.extract import build, model_handler, run
from pipeline.stage_weights import stage
from transforms.table_job import run_metadata

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
IMAGE = "us-central1-docker.pkg.dev/my-project/ml/featurebeam:0.2.0"


@pytest.fixture(scope="module")
def staged_weights(tmp_path_factory) -> str:
    return stage("mobilenet_v2", "none", str(tmp_path_factory.mktemp("weights")))


def script_args(script: str, **env) -> list[str]:
    out = subprocess.run(
        ["bash", str(DEPLOY / script), "--dry-run"],
        env={**os.environ, "PYTHON": sys.executable, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert out[:2] == ["-m", "pipeline.extract"]
    return out[2:]


def planned(config):
    """The run's plan, made as the job makes it (nothing is written)."""
    return [launch.plan(config.run, run_metadata(model_handler(config, config.recipe))).run]


def check_graph(pipeline: beam.Pipeline, proto: beam_runner_api_pb2.Pipeline) -> None:
    """Every ParDo's DoFn and every PCollection's coder survive pickling; the proto reads back."""
    for transform in proto.components.transforms.values():
        if transform.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = proto_utils.parse_Bytes(
                transform.spec.payload, beam_runner_api_pb2.ParDoPayload
            )
            pickler.loads(payload.do_fn.payload)
    for pcoll in proto.components.pcollections.values():
        assert pcoll.coder_id in proto.components.coders

    class Coders(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            for pcoll in node.outputs.values():
                coder = beam.coders.registry.get_coder(pcoll.element_type)
                pickler.loads(pickler.dumps(coder))

    pipeline.visit(Coders())
    beam.Pipeline.from_runner_api(proto, pipeline.runner, pipeline._options)


def dataflow_args(image_tree, out, weights) -> list[str]:
    return script_args(
        "dataflow/run.sh",
        PROJECT="my-project",
        BUCKET="featurebeam-staging",
        IMAGE=IMAGE,
        INPUT=str(image_tree),
        OUTPUT=str(out),
        WEIGHTS=weights,
        BACKBONE="mobilenet_v2",
    )


def test_dataflow_gpu_job_translates_offline(image_tree, tmp_path, staged_weights):
    argv = dataflow_args(image_tree, tmp_path / "out", staged_weights)
    config, beam_args = parse_args(argv)
    assert config.recipe.weights == staged_weights and config.run.mode == "incremental"
    options = PipelineOptions([*beam_args, "--dry_run=True"])
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    runner = DataflowRunner()
    assert PipelineOptionsValidator(options, runner).validate() == []
    all_options = options.get_all_options()
    assert all_options["dataflow_service_options"] == [
        "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    ]
    assert "no_use_multiple_sdk_containers" in all_options["experiments"]

    pipeline = beam.Pipeline(runner=runner, options=options)
    build(pipeline, config, planned(config))
    assert pipeline.run().state == "DONE"  # dry run: translated, not submitted
    proto = runner.proto_pipeline
    (environment,) = proto.components.environments.values()
    docker = beam_runner_api_pb2.DockerPayload.FromString(environment.payload)
    assert docker.container_image == IMAGE
    check_graph(pipeline, proto)
    assert runner.job is not None


def test_flink_job_translates_offline(image_tree, tmp_path, staged_weights):
    argv = script_args(
        "flink/run.sh",
        INPUT=str(image_tree),
        OUTPUT=str(tmp_path / "out"),
        WEIGHTS=staged_weights,
        BACKBONE="mobilenet_v2",
    )
    config, beam_args = parse_args(argv)
    options = PipelineOptions(beam_args)
    from apache_beam.runners.portability.flink_runner import FlinkRunner

    runner = FlinkRunner()
    assert PipelineOptionsValidator(options, runner).validate() == []
    assert config.intra_op_threads == 4
    pipeline = beam.Pipeline(runner=runner, options=options)
    build(pipeline, config, planned(config))
    environment = environments.Environment.from_options(options.view_as(PortableOptions))
    proto = pipeline.to_runner_api(default_environment=environment)
    (env,) = proto.components.environments.values()
    assert env.urn == common_urns.environments.EXTERNAL.urn
    external = beam_runner_api_pb2.ExternalPayload.FromString(env.payload)
    assert external.endpoint.url == "localhost:50000"
    check_graph(pipeline, proto)


def test_flex_template_parameters_are_job_flags():
    metadata = json.loads((DEPLOY / "dataflow" / "metadata.json").read_text())
    flags = [f"--{p['name']}=1" for p in metadata["parameters"]]
    values = {
        "--pooling=1": "--pooling=avg",
        "--mode=1": "--mode=incremental",
        "--image_size=1": "--image_size=96",
    }
    values |= {"--precision=1": "--precision=float32", "--weights=1": "--weights=none"}
    values |= {"--layer=1": "--layer=", "--backbone=1": "--backbone=mobilenet_v2"}
    config, beam_args = parse_args([values.get(f, f) for f in flags])
    assert beam_args == [], f"template parameters the job does not know: {beam_args}"
    assert (config.batch_size, config.run.chunk_size, config.decode_threads) == (1, 1, 1)


def test_staged_weights_give_the_same_vectors(image_tree, tmp_path, staged_weights):
    from pipeline.extract import run
    from transforms import table

    common = ["--input", str(image_tree), "--backbone", "mobilenet_v2", "--image-size", "64"]
    run([*common, "--weights", "none", "--output", str(tmp_path / "a")])
    run([*common, "--weights", staged_weights, "--output", str(tmp_path / "b")])
    a = table.read_table(str(tmp_path / "a")).sort_by("image_id")
    b = table.read_table(str(tmp_path / "b")).sort_by("image_id")
    assert abs(table.features_matrix(a) - table.features_matrix(b)).max() < 1e-5


def test_schedule_examples_are_well_formed():
    compile((DEPLOY / "schedule" / "airflow_dag.py").read_text(), "airflow_dag.py", "exec")
    for script in (
        "schedule/cloud_scheduler.sh",
        "dataflow/build.sh",
        "dataflow/launch_template.sh",
    ):
        subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True)
    cron = [
        line
        for line in (DEPLOY / "schedule" / "crontab").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert len(cron) == 1 and "--mode incremental" in cron[0]


def hashes(folder: pathlib.Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_planning_a_dry_run_and_a_translation_change_nothing(image_tree, tmp_path, staged_weights):
    """Over a table with new, changed and deleted inputs: --plan-only, a Dataflow dry run of the
    job and a graph translation leave every file of the output byte-identical."""
    from conftest import encode, gradient

    out = tmp_path / "out"
    common = ["--backbone", "mobilenet_v2", "--weights", staged_weights, "--image-size", "32"]
    run(["--input", str(image_tree), "--output", str(out), *common])
    (image_tree / "train" / "cats" / "new.png").write_bytes(encode(gradient(seed=77)))
    (image_tree / "val" / "dogs" / "0.png").write_bytes(encode(gradient(50, 50, seed=78)))
    (image_tree / "val" / "cats" / "1.jpg").unlink()
    before = hashes(out)
    incremental = ["--mode", "incremental", "--prune"]

    plan = run(["--input", str(image_tree), "--output", str(out), *common, *incremental,
                "--plan-only"])["plan"]  # fmt: skip
    assert (plan.listed, plan.to_embed, plan.new, plan.changed) == (12, 2, 1, 1)
    assert (plan.kept_rows, plan.stale_rows, plan.unlisted_rows) == (10, 1, 1)
    assert hashes(out) == before

    argv = dataflow_args(image_tree, out, staged_weights)
    dry = run([*argv, "--image_size=32", "--prune", "--dry_run=True"])
    assert dry["dry_run"] and dry["plan"].to_embed == 2
    assert hashes(out) == before

    config, beam_args = parse_args([*argv, "--image_size=32"])
    pipeline = beam.Pipeline(options=PipelineOptions([*beam_args, "--dry_run=True"]))
    build(pipeline, config, planned(config))
    pipeline.to_runner_api()
    assert hashes(out) == before


def test_classic_templates_are_refused(image_tree, tmp_path, staged_weights, monkeypatch):
    monkeypatch.delenv(launch.FLEX_LAUNCH_ENV, raising=False)
    argv = dataflow_args(image_tree, tmp_path / "out", staged_weights)
    with pytest.raises(ValueError, match="flex template"):
        run([*argv, "--template_location=gs://featurebeam-staging/templates/t"])
    assert not (tmp_path / "out").exists()


def launcher_argv(bucket: str, job_object: str, **parameters: str) -> list[str]:
    """What Dataflow's Python flex-template launcher runs the main file with: Beam's options for
    the job (runner, project, region, the staging and temp locations, the job file to write in
    the staging bucket's template_launches/, the job name, the worker image), then every template
    parameter as --name=value (launch_template.sh's, here with the nightly --prune=true)."""
    return [
        "--runner=DataflowRunner",
        "--project=my-project",
        "--region=us-central1",
        f"--staging_location={bucket}/staging",
        f"--temp_location={bucket}/tmp",
        f"--template_location={job_object}",
        "--job_name=featurebeam-20261203-200000",
        f"--sdk_container_image={IMAGE}",
        *(f"--{name}={value}" for name, value in parameters.items()),
    ]


def test_flex_launch_submits_and_exits_leaving_the_lease_to_the_workers(
    gcs_emulator,  # noqa: F811  (the fixture imported from test_gcs)
    image_tree,
    tmp_path,
    staged_weights,
):
    """deploy/dataflow/main.py run as the flex launcher runs it, against a local GCS emulator:
    the DataflowRunner writes the job object (it creates no job: the launcher does, from that
    file, after the program exits), the plan file is in the table, the lease is held by this run
    for the workers to renew and give back, no row is written and nothing was waited for."""
    from transforms import lease as leases
    from transforms import storage
    from transforms.plan import PLANS_DIR

    output = f"{gcs_emulator}/tables/flex"
    job_object = f"{gcs_emulator}/staging/template_launches/2026-12-03_20_00_00-1/job_object"
    params = {
        "input": str(image_tree),
        "output": output,
        "backbone": "mobilenet_v2",
        "weights": staged_weights,
        "mode": "incremental",
        "prune": "true",
        "retry_errors": "false",
        "image_size": "32",
        "batch_size": "128",
        "chunk_size": "5",
        "decode_threads": "auto",
        "cache_dir": "/tmp/featurebeam-weights",
        "lease_expiry": "1800",
        "number_of_worker_harness_threads": "4",
        "dataflow_service_options": "worker_accelerator=type:nvidia-tesla-t4;count:1;"
        "install-nvidia-driver",
    }
    env = {**os.environ, "PYTHONPATH": str(DEPLOY.parent)}
    env.pop(launch.FLEX_LAUNCH_ENV, None)  # main.py sets it
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "dataflow" / "main.py"),
            *launcher_argv(gcs_emulator, job_object, **params),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert "submitted: the job is written to " + job_object in done.stdout

    job = json.loads(storage.read_bytes(job_object))
    assert (job["name"], job["type"]) == ("featurebeam-20261203-200000", "JOB_TYPE_BATCH")
    (pool,) = job["environment"]["workerPools"]
    assert pool["sdkHarnessContainerImages"][0]["containerImage"] == IMAGE
    # Runner v2: the job file points at the pipeline proto staged beside it.
    url = job["environment"]["sdkPipelineOptions"]["options"]["pipelineUrl"]
    proto = beam_runner_api_pb2.Pipeline.FromString(storage.read_bytes(url))
    names = [t.unique_name for t in proto.components.transforms.values()]
    assert any("Embed" in n or "embed" in n for n in names), names

    lease = leases.read_lease(output)
    assert lease is not None, "the launch gave the lease back: the workers would run without it"
    assert float(lease["expiry_s"]) == 1800
    (plan_uri,) = [u for u in storage_list(output, PLANS_DIR) if u.endswith(".parquet")]
    assert lease["run_id"] in plan_uri
    assert not storage.exists(storage.join(output, "_SUMMARY.json"))
    assert seconds < 120, f"the launch took {seconds:.0f} s"


def storage_list(output: str, folder: str) -> list[str]:
    from transforms import storage

    fs, path = storage.filesystem(storage.join(output, folder))
    return [storage.to_uri(fs, p) for p in fs.ls(path, detail=False)]


def test_the_image_pins_what_pyproject_pins_and_its_context_leaves_the_venv_out():
    import re
    import sys as system

    dockerfile = (DEPLOY / "dataflow" / "Dockerfile").read_text()
    pyproject = (DEPLOY.parent / "pyproject.toml").read_text()
    arg = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    assert f'"apache-beam=={arg["BEAM_VERSION"]}"' in pyproject
    assert f'"tensorflow=={arg["TF_VERSION"]}"' in pyproject
    assert arg["PY_VERSION"] == "{}.{}".format(*system.version_info[:2])  # the image's = ours
    assert "FROM apache/beam_python${PY_VERSION}_sdk:${BEAM_VERSION}" in dockerfile
    assert '"tensorflow[and-cuda]==${TF_VERSION}"' in dockerfile
    assert "python -V" in dockerfile and "pip check" in dockerfile
    assert "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in dockerfile
    ignored = (DEPLOY.parent / ".dockerignore").read_text().split()
    assert {".venv", ".git", "out", "tests"} <= set(ignored)


def test_launch_template_passes_disk_size_launcher_machine_and_prune():
    env = dict(PROJECT="p", BUCKET="b", IMAGE=IMAGE, INPUT="gs://b/i", OUTPUT="gs://b/o")
    env |= dict(WEIGHTS="none", PRUNE="true", DISK_SIZE_GB="80")
    env |= dict(LAUNCHER_MACHINE_TYPE="n1-highmem-4")
    out = subprocess.run(
        ["bash", str(DEPLOY / "dataflow" / "launch_template.sh"), "--dry-run"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert out[out.index("--disk-size-gb") + 1] == "80"
    assert out[out.index("--launcher-machine-type") + 1] == "n1-highmem-4"
    params = dict(p.split("=", 1) for p in out[out.index("--parameters") + 1][3:].split("~"))
    assert (params["prune"], params["lease_expiry"]) == ("true", "1800")
    declared = {
        p["name"]
        for p in json.loads((DEPLOY / "dataflow" / "metadata.json").read_text())["parameters"]
    }
    beam_options = {
        "sdk_container_image",
        "number_of_worker_harness_threads",
        "dataflow_service_options",
    }
    assert set(params) - beam_options <= declared, set(params) - beam_options - declared
    config, _ = parse_args([f"--{k}={v}" for k, v in params.items() if k not in beam_options])
    assert config.run.prune and config.run.lease_expiry_s == 1800


def test_cloud_scheduler_launches_declared_parameters_and_prunes():
    """The nightly Cloud Scheduler request passes only declared template parameters (or Beam's
    own options), values the job accepts, incremental mode and prune (PRUNE=false turns it off)."""
    env = dict(PROJECT="p", BUCKET="b", IMAGE=IMAGE, INPUT="gs://b/i", OUTPUT="gs://b/o")
    env |= dict(WEIGHTS="none", SERVICE_ACCOUNT="s@p.iam.gserviceaccount.com")
    declared = {
        p["name"]
        for p in json.loads((DEPLOY / "dataflow" / "metadata.json").read_text())["parameters"]
    }
    beam_options = {"sdk_container_image", "number_of_worker_harness_threads"}
    for prune, want in ((None, True), ("false", False)):
        body = subprocess.run(
            ["bash", str(DEPLOY / "schedule" / "cloud_scheduler.sh"), "--dry-run"],
            env={**os.environ, **env, **({"PRUNE": prune} if prune else {})},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        params = json.loads(body)["launchParameter"]["parameters"]
        assert set(params) - beam_options <= declared, set(params) - beam_options - declared
        config, _ = parse_args([f"--{k}={v}" for k, v in params.items() if k not in beam_options])
        assert config.run.mode == "incremental" and config.run.prune is want


def test_run_sh_refuses_a_python_other_than_the_images():
    env = dict(PROJECT="p", BUCKET="b", IMAGE=IMAGE, INPUT="i", OUTPUT="o", WEIGHTS="w")
    done = subprocess.run(
        ["bash", str(DEPLOY / "dataflow" / "run.sh"), "--dry-run"],
        env={**os.environ, **env, "PYTHON": sys.executable, "IMAGE_PYTHON": "3.99"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "the image's is 3.99" in done.stderr


def test_flink_sidecar_gets_storage_credentials_and_the_gpu_variant_one_slot_and_a_gpu():
    import yaml

    cpu, gpu = yaml.safe_load_all((DEPLOY / "flink" / "flink-deployment.yaml").read_text())
    for deployment in (cpu, gpu):
        pod = deployment["spec"]["taskManager"]["podTemplate"]["spec"]
        (sidecar,) = [c for c in pod["containers"] if c["name"] == "beam-worker-pool"]
        env = {e["name"]: e["value"] for e in sidecar["env"]}
        (mount,) = sidecar["volumeMounts"]
        assert env["GOOGLE_APPLICATION_CREDENTIALS"].startswith(mount["mountPath"] + "/")
        assert {v["name"] for v in pod["volumes"]} == {mount["name"]}
    assert gpu["spec"]["flinkConfiguration"]["taskmanager.numberOfTaskSlots"] == "1"
    assert sidecar["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    flink = (DEPLOY / "flink" / "run.sh").read_text()
    assert "Java 11" not in flink and "--flink_job_server_jar" in flink
