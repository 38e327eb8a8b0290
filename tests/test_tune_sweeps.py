"""Ray Tune sweeps (sweeps/): layout and option checks, then real sweeps on this module's own local
cluster (``ray_cluster`` is module-scoped, so the order of test files does not matter)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import servers
from faults import CrashAtStep
from sweeps import condition_shift, loss_weights
from sweeps.tuning import (
    SweepError,
    TrialOutcome,
    derive_concurrency,
    grid_table,
    run_sweep,
)

REPO = Path(__file__).resolve().parent.parent
# A trial in seconds: the bundled teacher, 3 APEX steps on 64 in-memory pairs, 1 image per prompt
# (during training and when the exports are scored for the tables).
FAST = ["--steps", "3", "--concurrency", "2", "--images-per-prompt", "1", "--eval-images-per-prompt", "1",
        "data.source=inline-shapeeval",
        "data.num_samples=64", "train.global_batch=8", "objective.buffer_size=64"]


def test_condition_shift_cells_follow_the_paper_grid():
    cells = condition_shift.cells(condition_shift.PAPER_A, condition_shift.PAPER_B)
    assert len(cells) == 12
    assert cells[0].overrides == {"objective.apex.shift_a": -1.0, "objective.apex.shift_b": 0.0}
    assert [c.column for c in cells[:4]] == ["0.0", "0.1", "1.0", "10.0"]
    assert [c.row for c in cells[::4]] == ["-1.0", "-0.5", "0.5"]


def test_loss_weight_rows_include_both_single_loss_rows():
    cells = loss_weights.cells(loss_weights.PAPER_RATIOS)
    assert [c.row for c in cells] == ["1.0 : 0.0 (Path Only)", "0.0 : 1.0 (Endpoint Only)", "1.0 : 0.5",
                                      "1.0 : 1.0 (default)", "1.0 : 2.0"]
    assert cells[1].overrides == {"objective.apex.lambda_path": 0.0, "objective.apex.lambda_endpoint": 1.0}


def test_grid_table_places_scores_and_marks_failures():
    outcomes = [TrialOutcome("x", "-1.0", "0.1", {}, "ok", {"overall": 0.5}),
                TrialOutcome("y", "-1.0", "1.0", {}, "failed", {}),
                TrialOutcome("z", "0.5", "0.1", {}, "diverged", {})]
    table = grid_table(outcomes, ["-1.0", "0.5"], ["0.1", "1.0"], "a \\ b").splitlines()
    assert table[0] == "| a \\ b | 0.1 | 1.0 |"
    assert table[2] == "| -1.0 | 0.500 | failed |"
    assert table[3] == "| 0.5 | diverged | — |"


def test_concurrency_is_what_the_cluster_fits():
    assert derive_concurrency({"CPU": 2.0}, {"CPU": 8.0}, None) == 4
    assert derive_concurrency({"CPU": 2.0}, {"CPU": 8.0}, 3) == 3
    assert derive_concurrency({"CPU": 2.0}, {"CPU": 8.0}, 10) == 4  # never more than fits: no deadlock
    assert derive_concurrency({"CPU": 1.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 4.0}, None) == 2
    with pytest.raises(SweepError, match="one trial needs"):
        derive_concurrency({"CPU": 4.0}, {"CPU": 2.0}, None)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--search", "optuna"], "--trials N"),
    (["--search", "optuna", "--trials", "2", "--a-range=1,-1"], "must be below"),
    (["optim.lr=-1"], "optim.lr"),
    (["--backbone", "sana-600m"], "model.pretrained"),
])
def test_bad_options_fail_before_any_trial(tmp_path, capsys, argv, message):
    code = condition_shift.main(["--output-dir", str(tmp_path), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "condition-shift" / "tune").exists()


def test_existing_sweep_needs_resume(tmp_path, capsys):
    (tmp_path / "loss-weights" / "tune").mkdir(parents=True)
    assert loss_weights.main(["--output-dir", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert loss_weights.main(["--output-dir", str(tmp_path), "--name", "other", "--resume"]) == 2
    assert "no sweep 'other'" in capsys.readouterr().err


def test_sweeps_share_the_training_runs_store_by_default(tmp_path, monkeypatch):
    from apex_ray.orchestration.tracking import TrackingError, resolve_tracking_uri
    from sweeps.tuning import sweep_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    sweep = condition_shift.build(condition_shift.arguments().parse_args(["--output-dir", "sweeps-out"]))
    # The store and experiment of an ordinary `python -m apex_ray.train` run: runs/apex/mlflow.db.
    assert sweep_tracking_uri(sweep) == f"sqlite:///{tmp_path / 'runs' / 'apex' / 'mlflow.db'}"
    assert sweep_tracking_uri(sweep) == resolve_tracking_uri(None, "runs/apex")
    assert sweep.base.tracking.experiment == "apex-ray"
    moved = condition_shift.build(condition_shift.arguments().parse_args(["--output-dir", "out", "output_dir=elsewhere"]))
    assert sweep_tracking_uri(moved) == f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    served = condition_shift.build(condition_shift.arguments().parse_args(
        ["--output-dir", "out", "tracking.tracking_uri=http://mlflow:5000"]))
    assert sweep_tracking_uri(served) == "http://mlflow:5000"
    in_bucket = condition_shift.build(condition_shift.arguments().parse_args(["--output-dir", "s3://bucket/sweeps"]))
    with pytest.raises(TrackingError, match="tracking_uri"):  # object storage still needs a server
        sweep_tracking_uri(in_bucket)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps-out").exists()
    # A sweep begun when each sweep had its own store keeps it (its --resume finds its runs there).
    (tmp_path / "sweeps-out" / "condition-shift").mkdir(parents=True)
    (tmp_path / "sweeps-out" / "condition-shift" / "mlflow.db").touch()
    assert sweep_tracking_uri(sweep) == f"sqlite:///{tmp_path / 'sweeps-out' / 'condition-shift' / 'mlflow.db'}"


def test_a_new_sweep_may_not_take_a_name_the_shared_store_holds(tmp_path, monkeypatch, capsys):
    from apex_ray.orchestration.tracking import RunLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'apex' / 'mlflow.db'}"
    argv = ["--output-dir", str(tmp_path / "sweeps"), f"output_dir={tmp_path / 'apex'}"]
    # An ordinary training run of the same name is not a sweep: no conflict (validation passes).
    RunLogger.create(store, "apex-ray", "loss-weights", {}, {}).finish()
    from sweeps.tuning import validate

    validate(loss_weights.build(loss_weights.arguments().parse_args(argv)))
    # A sweep parent of that name whose folder is gone (no Tune state to resume): refused, with the fix.
    RunLogger.create(store, "apex-ray", "loss-weights", {"role": "sweep-parent"}, {}).finish("KILLED")
    assert loss_weights.main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a sweep 'loss-weights'" in err and "--name NEW" in err, err
    assert not (tmp_path / "sweeps" / "loss-weights" / "tune").exists()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a sqlite store and proxied artifacts."""
    with servers.mlflow_server(tmp_path) as uri:
        yield uri


def _rest(uri: str, endpoint: str, payload: dict | None = None) -> dict:
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_2x2_grid_over_http_mlflow(ray_cluster, tmp_path, capsys, mlflow_server):
    code = condition_shift.main(["--a=-0.5,0.5", "--b=0.1,1", "--output-dir", str(tmp_path), "--name", "grid",
                                 *FAST, f"tracking.tracking_uri={mlflow_server}"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    header = lines.index("| a \\ b | 0.1 | 1.0 |")  # the EMA's table (the student's follows)
    for offset, a in ((2, "-0.5"), (3, "0.5")):
        cells = [c.strip() for c in lines[header + offset].strip("|").split("|")]
        assert cells[0] == a
        for value in cells[1:]:  # mean [lo, hi] of the exported EMA, scored offline
            mean, lo, hi = (float(v) for v in value.replace("[", " ").replace("]", " ").replace(",", " ").split())
            assert 0.0 <= lo <= mean <= hi <= 1.0, lines[header + offset]
    assert "over prompts only" in out and "student (export/student)" in out

    # Read back through the server's REST API: one parent, four children nested under it.
    experiment = _rest(mlflow_server, "experiments/get-by-name?experiment_name=apex-ray")["experiment"]
    runs = _rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                "max_results": 100})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    parent = by_name["grid"]
    assert parent["info"]["status"] == "FINISHED"
    children = [r for r in runs if any(t["key"] == "mlflow.parentRunId" and t["value"] == parent["info"]["run_id"]
                                       for t in r["data"].get("tags", []))]
    assert sorted(r["info"]["run_name"] for r in children) == [
        "grid/a=-0.5 b=0.1", "grid/a=-0.5 b=1.0", "grid/a=0.5 b=0.1", "grid/a=0.5 b=1.0"]
    for child in children:
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert 0.0 <= metrics["shapeeval_nfe1/overall"] <= 1.0 and "loss" in metrics
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert params["train.steps"] == "3"
    parent_metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert parent_metrics["trials_ok"] == 4.0
    artifacts = _rest(mlflow_server, f"artifacts/list?run_id={parent['info']['run_id']}")["files"]
    assert {"table.md", "table.csv", "heatmap.png"} <= {a["path"] for a in artifacts}


@pytest.mark.slow
def test_failing_trial_is_marked_and_the_sweep_finishes(ray_cluster, tmp_path):
    sweep = loss_weights.build(loss_weights.arguments().parse_args(
        ["--ratios", "1:0,1:1", "--name", "fail", "--output-dir", str(tmp_path), *FAST, f"output_dir={tmp_path}"]))
    sweep.base.distributed.max_failures = 0
    sweep.train_loop = CrashAtStep(1, run_name_suffix="lp=1 le=0")  # that trial's worker dies at step 1
    outcomes = {o.label: o for o in run_sweep(sweep)}
    assert outcomes["lp=1 le=0"].status == "failed" and outcomes["lp=1 le=0"].error
    assert outcomes["lp=1 le=1"].status == "ok" and 0.0 <= outcomes["lp=1 le=1"].overall <= 1.0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the training runs' store (base output_dir)
    parent = client.search_runs([client.get_experiment_by_name("apex-ray").experiment_id],
                                "attributes.run_name = 'fail'")[0]
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_ok"] == 1
    table = client.download_artifacts(parent.info.run_id, "table.md", str(tmp_path))
    assert "| 1.0 : 0.0 (Path Only) | failed |" in Path(table).read_text()


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    # The overrides (FAST's and output_dir, where the MLflow store goes) stay together: argparse
    # takes the positional overrides as one run of words.
    argv = ["--ratios", "1:0,1:1", "--output-dir", str(tmp_path), *FAST, f"output_dir={tmp_path}", "--concurrency", "1"]
    process = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "loss_weights.py"), *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                               env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, start_new_session=True)
    seen = []
    for line in process.stdout:  # wait for the first trial to finish, then Ctrl+C the sweep
        seen.append(line)
        if "[1/2 done" in line:
            os.killpg(process.pid, signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=300)
    log = "".join(seen) + rest
    assert process.returncode == 130, log
    assert "--resume" in log
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("apex-ray").experiment_id
    first = client.search_runs([experiment], "attributes.run_name = 'loss-weights/lp=1 le=0'")
    assert len(first) == 1 and first[0].info.status == "FINISHED"

    outcomes = {o.label: o for o in run_sweep(loss_weights.build(loss_weights.arguments().parse_args(
        [*argv, "--resume"])))}
    assert set(outcomes) == {"lp=1 le=0", "lp=1 le=1"}
    assert all(o.status == "ok" for o in outcomes.values())
    again = client.search_runs([experiment], "attributes.run_name = 'loss-weights/lp=1 le=0'")
    assert len(again) == 1 and again[0].info.start_time == first[0].info.start_time  # not rerun
    assert client.search_runs([experiment], "attributes.run_name = 'loss-weights'")[0].info.status == "FINISHED"


@pytest.mark.slow
def test_optuna_search_with_asha_runs_its_trial_budget(ray_cluster, tmp_path, capsys):
    code = condition_shift.main(["--search", "optuna", "--trials", "2", "--scheduler", "asha", "--name", "opt",
                                 "--output-dir", str(tmp_path), *FAST, f"output_dir={tmp_path}", "--steps", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| shift_a=")]
    assert len(rows) >= 2 and all("| ok |" in row for row in rows), out  # ranked table + per-task table
