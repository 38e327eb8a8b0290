"""Distributed training on Ray Train (CPU, gloo), sharing one local Ray cluster."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from apex_ray.config import load_config
from apex_ray.engine.export import export_checkpoint
from apex_ray.models import load_backbone
from apex_ray.orchestration.launcher import run
from faults import CrashAtStep, report_log

TINY = ["train.global_batch=4", "data.num_samples=48", "eval.images_per_prompt=1", "eval.grid_size=8",
        "train.log_every=1", "train.eval_every=1000"]


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path}", *TINY, *overrides])


def exported(result, which: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.export_path) / which / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_two_worker_fsdp_run_tracks_everything_in_mlflow(ray_cluster, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square above a green triangle\nthree yellow stars\n")
    config = tiny_config(tmp_path, "train.steps=3", "train.checkpoint_every=2", "tracking.run_name=fsdp-run",
                         "eval.grid_nfe=[1,2]", "eval.score_nfe=[1]", f"data.cache_dir={tmp_path / 'cache'}",
                         f"eval.prompts={prompts}")
    assert config.data.source == "shapeeval"  # raw ShapeEval parquet -> Ray Data prepare -> streamed shards
    reports = tmp_path / "reports.log"
    result = run(config, callbacks=[report_log(reports)])
    assert result.metrics["step"] == 3
    # MLflow has every logged step (log_every=1); Ray Train heard only of the checkpoints (the last
    # one also evaluates): a report per step would wait for the controller's 2 s poll each time.
    assert reports.read_text().split("\n")[:-1] == ["2 1", "3 1"]
    manifests = list((tmp_path / "cache").glob("*/prepared/manifest.json"))
    assert len(manifests) == 1 and (manifests[0].parent.parent / "raw.parquet").is_file()
    client = MlflowClient(result.tracking_uri)
    run_info = client.get_run(result.run_id)
    assert run_info.info.status == "FINISHED"
    assert run_info.data.params["optim.lr"] == str(config.optim.lr)
    assert run_info.data.params["objective.apex.shift_a"] == str(config.objective.apex.shift_a)
    assert run_info.data.tags["strategy"] == "fsdp"
    for key in ("loss", "loss_path", "loss_adv", "loss_shift", "grad_norm", "lr", "samples_per_s", "ema_decay"):
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in history] == [1, 2, 3], key
    # ShapeEval of the starting weights at step 0 (MLflow only, not a Ray Train report), then at the end.
    overall = client.get_metric_history(result.run_id, "shapeeval_nfe1/overall")
    assert sorted(m.step for m in overall) == [0, 3] and all(0.0 <= m.value <= 1.0 for m in overall)
    assert client.get_metric_history(result.run_id, "shapeeval_nfe1/counting")
    # Issue 15's branch-separation diagnostics at the evaluation, through the FSDP-sharded model and frozen copy.
    for key in ("diag/fit_shifted_gen", "diag/fit_plain_gen", "diag/fit_shifted_real", "diag/fit_plain_real",
                "diag/delta_ratio", "diag/cos_delta_frozen", "diag/plain_drift_rms", "diag/contrast_gen"):
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in history] == [3] and math.isfinite(history[0].value), key
    # Sample grids are MLflow images with a key and a step (the UI's step slider, runs side by side).
    images = [a.path for a in client.list_artifacts(result.run_id, "images")]
    assert any("samples~nfe1+step+3+" in path and path.endswith(".png") for path in images), images
    assert any("samples~nfe2+step+3+" in path for path in images), images
    assert any("samples~nfe1+step+0+" in path for path in images), images
    # The eval.prompts grids, at every grid NFE, at step 0 and at evaluations.
    assert any("prompts~nfe1+step+0+" in path and path.endswith(".png") for path in images), images
    assert any("prompts~nfe1+step+3+" in path for path in images), images
    assert any("prompts~nfe2+step+3+" in path for path in images), images
    # Beside the grids, their captions in grid order.
    listed = json.loads(Path(client.download_artifacts(result.run_id, "captions/prompts_nfe1.json",
                                                       str(tmp_path / "dl-captions"))).read_text())
    assert listed["captions"] == ["a red circle", "a blue square above a green triangle", "three yellow stars"]
    assert {a.path for a in client.list_artifacts(result.run_id, "captions")} >= {
        "captions/samples_nfe1.json", "captions/samples_nfe2.json", "captions/prompts_nfe2.json"}
    # samples_per_s is the global rate (both workers); the per-worker mean beside it.
    rate = {m.step: m.value for m in client.get_metric_history(result.run_id, "samples_per_s")}
    per_worker = {m.step: m.value for m in client.get_metric_history(result.run_id, "samples_per_s_per_worker")}
    assert rate.keys() == per_worker.keys() == {1, 2, 3}
    assert all(rate[s] == pytest.approx(2 * per_worker[s]) for s in rate)
    # What a researcher opens first: the training view, a description, where the run came from,
    # the resolved config as a file, artifacts beside the store.
    experiment = client.get_experiment(run_info.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    assert "APEX one-step fine-tune of sana-tiny" in run_info.data.tags["mlflow.note.content"]
    assert run_info.data.tags["mlflow.user"] and run_info.data.tags["mlflow.source.type"] == "LOCAL"
    config_file = Path(client.download_artifacts(result.run_id, "config.yaml", str(tmp_path / "dl")))
    assert load_config(config_file, []).objective.apex.shift_a == config.objective.apex.shift_a
    # The exported weights as logged models of the run (uploaded once: no export/ artifacts copy).
    logged = client.search_logged_models([run_info.info.experiment_id],
                                         filter_string=f"source_run_id = '{result.run_id}'")
    assert {m.name for m in logged} == {"ema", "student"}
    assert not client.list_artifacts(result.run_id, "export")
    # The exported EMA loads back as a model and runs.
    model = load_backbone(Path(result.export_path) / "ema")
    assert sum(p.numel() for p in model.parameters()) > 1e6
    ckpts = sorted(p.name for p in (Path(result.storage_path) / "fsdp-run").glob("step_*"))
    assert ckpts == ["step_0000002", "step_0000003"]
    # `python -m apex_ray.export` rebuilds the same weights from the 2-worker DCP shards on one CPU.
    written = export_checkpoint(result.checkpoint_path, tmp_path / "exported")
    for which in ("ema", "student"):
        ours = load_file(str(written[which] / "diffusion_pytorch_model.safetensors"))
        theirs = exported(result, which)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shapeeval", "inline-shapeeval"])  # Ray Data stream (the default) / in memory
def test_worker_crash_resumes_from_checkpoint_and_matches_uninterrupted_run(ray_cluster, tmp_path, source, capsys):
    common = ["train.steps=5", "train.checkpoint_every=2", "eval.grid_nfe=[]", "eval.score_nfe=[]",
              "distributed.max_failures=1", f"data.source={source}", f"data.cache_dir={tmp_path / 'cache'}"]
    straight = run(tiny_config(tmp_path / "a", *common, "tracking.run_name=straight"))
    crashed = run(tiny_config(tmp_path / "b", *common, "tracking.run_name=crashed"),
                  train_loop=CrashAtStep(4, marker=tmp_path / "crashed-once"))  # the last rank dies once at step 4
    assert crashed.metrics["step"] == 5
    # The console said why the workers restarted and how many restarts are left.
    restarts = [line for line in capsys.readouterr().out.splitlines() if "worker group failed" in line]
    assert len(restarts) == 1 and restarts[0].startswith("apex-ray: worker group failed (rank 1: "), restarts
    assert restarts[0].endswith("); restarting from the latest checkpoint, 0 of 1 restart left"), restarts
    for which in ("ema", "student"):
        a, b = exported(straight, which), exported(crashed, which)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, f"{which} differs by {worst} after resume"
    # The resumed run continued its step count and reproduced the same losses.
    client = MlflowClient(crashed.tracking_uri)
    history = client.get_metric_history(crashed.run_id, "loss")
    # Step 3 was logged before the crash and redone after the restart from step 2's checkpoint;
    # the restarted attempt logs only the steps MLflow lacks, so each step has one point.
    steps = sorted(m.step for m in history)
    assert steps == [1, 2, 3, 4, 5]
    losses = {m.step: m.value for m in history}
    straight_losses = {m.step: m.value for m in MlflowClient(straight.tracking_uri).get_metric_history(straight.run_id, "loss")}
    assert set(losses) == {1, 2, 3, 4, 5}
    assert losses[5] == pytest.approx(straight_losses[5], abs=1e-6)
    if source != "inline-shapeeval":
        return
    # Training from scratch differs, so the comparison above is not vacuous.
    other = run(tiny_config(tmp_path / "c", *common, "train.seed=1", "tracking.run_name=other-seed"))
    diff = max((exported(other, "ema")[k] - exported(straight, "ema")[k]).abs().max().item()
               for k in exported(straight, "ema"))
    assert diff > 1e-4


@pytest.mark.slow
def test_rerun_resumes_on_a_different_worker_count(ray_cluster, tmp_path, capsys):
    base = ["eval.grid_nfe=[]", "eval.score_nfe=[1]", "tracking.run_name=grow", "train.checkpoint_every=2"]
    first = run(tiny_config(tmp_path, *base, "train.steps=2"))
    second = run(tiny_config(tmp_path, *base, "train.steps=4", "distributed.num_workers=1"))
    assert second.run_id == first.run_id  # the MLflow run continues too
    client = MlflowClient(second.tracking_uri)
    steps = [m.step for m in client.get_metric_history(second.run_id, "loss")]
    assert steps == [1, 2, 3, 4]
    # The starting weights are evaluated once, by the fresh run; the resumed one starts at step 2.
    assert sorted(m.step for m in client.get_metric_history(second.run_id, "shapeeval_nfe1/overall")) == [0, 2, 4]
    out = capsys.readouterr().out
    assert out.count("step 0 (starting weights) | ShapeEval nfe1") == 1, out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "single"])
def test_ddp_and_single_worker_with_micro_batch_one(ray_cluster, tmp_path, strategy):
    workers = 2 if strategy == "ddp" else 1
    config = tiny_config(tmp_path, "train.steps=2", "train.micro_batch=1", f"distributed.strategy={strategy}",
                         f"distributed.num_workers={workers}", "eval.grid_nfe=[1]", "eval.score_nfe=[]")
    assert config.grad_accum_steps == 4 // workers
    result = run(config)
    assert result.metrics["step"] == 2
    assert result.metrics["forward_calls"] >= config.grad_accum_steps


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apex_ray.train", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(
    "override, field",
    [("optim.lr=-1", "optim.lr"), ("model.backbone=sana-huge", "model.backbone"),
     ("objective.apex.anchor_frac=1.5", "anchor_frac"), ("train.global_batch=7", "global_batch"),
     ("data.source=prepared", "data.path"), ("optim.lrr=1", "optim.lrr"),
     ("objective.seed_buffer=/nonexistent/buffer", "objective.seed_buffer")],
)
def test_bad_config_fails_before_ray_starts(tmp_path, override, field):
    started = time.perf_counter()
    proc = run_cli(f"output_dir={tmp_path}", override)
    assert proc.returncode == 2
    assert field in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "ray").exists()
    assert time.perf_counter() - started < 60


def test_unreachable_tracking_server_fails_at_start(tmp_path):
    proc = run_cli(f"output_dir={tmp_path}", "tracking.tracking_uri=http://127.0.0.1:9")
    assert proc.returncode == 2
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:9" in proc.stderr
    assert not (tmp_path / "ray").exists()


def test_a_failure_before_training_marks_the_mlflow_run_failed(ray_cluster, tmp_path):
    """A run that dies before Ray Train starts (here: the ShapeEval cache cannot be made) is not
    left RUNNING in MLflow."""
    config = tiny_config(tmp_path, "tracking.run_name=early-failure", "data.cache_dir=/proc/apex-ray-cache")
    with pytest.raises(Exception):
        run(config)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == config.tracking.experiment]
    runs = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'early-failure'")
    assert [r.info.status for r in runs] == ["FAILED"]
    with pytest.raises(Exception):  # the rerun logs into the same run, not a second one of that name
        run(config)
    again = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'early-failure'")
    assert [(r.info.run_id, r.info.status) for r in again] == [(runs[0].info.run_id, "FAILED")]


@pytest.mark.slow
def test_lora_run_trains_adapters_exports_and_resumes(ray_cluster, tmp_path):
    base = ["model.lora.enabled=true", "model.lora.rank=4", "eval.grid_nfe=[1]", "eval.score_nfe=[]",
            "tracking.run_name=lora", "train.checkpoint_every=2", "data.source=inline-shapeeval"]
    first = run(tiny_config(tmp_path, *base, "train.steps=2"))
    export = Path(first.export_path)
    for which in ("ema", "student"):
        assert (export / "lora" / which / "pytorch_lora_weights.safetensors").is_file()
        load_backbone(export / which)  # the adapter merged into the base
    # MLflow: the merged weights inside the logged models, the adapters as the run's export/lora.
    from mlflow import MlflowClient

    client = MlflowClient(first.tracking_uri)
    adapters = {Path(a.path).name for a in client.list_artifacts(first.run_id, "export/lora")}
    assert adapters == {"ema", "student"}
    assert {Path(a.path).name for a in client.list_artifacts(first.run_id, "export")} == {"lora"}
    second = run(tiny_config(tmp_path, *base, "train.steps=3"))
    assert second.run_id == first.run_id and second.metrics["step"] == 3
    # The checkpoint holds adapters only, not the frozen base.
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(second.checkpoint_path).read_metadata().state_dict_metadata
    weight_keys = [k for k in keys if k.startswith(("train.adapter", "train.ema.weights", "train.model"))]
    assert weight_keys and all("lora" in k for k in weight_keys), weight_keys[:5]
