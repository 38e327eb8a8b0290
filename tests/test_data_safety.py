"""Data-safety guarantees of the Ray Data jobs (docs/reliability.md, "Data jobs"): nothing a user
made is deleted (item 1), ``--overwrite`` swaps the new set in only when complete (item 2), one
job per output folder (item 3), duplicate ids become ``duplicate_id`` rejects (item 13)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_pipelines.output as output_module
from apex_ray.engine.prepared import read_manifest, read_rows
from apex_ray.shapeeval import write_pairs
from data_pipelines import prepare_latents, shapeeval_set
from data_pipelines.config import FakeBufferConfig, InputConfig, load_prepare_config
from data_pipelines.decode import DUPLICATE_ID
from data_pipelines.output import LOCK_FILE, MARKER, FolderLock, OutputError, StagedOutput
from data_pipelines.prepare_latents import prepare
from data_pipelines.readers import InputError, plan_input

FAST = ["codec.batch_size=8", "text.batch_size=8", "storage.rows_per_shard=4"]
REPO = Path(__file__).resolve().parents[1]


def config_for(input_path, output, *overrides, **settings):
    settings = {"input.path": str(input_path), "output": str(output), **settings}
    return load_prepare_config(None, [*FAST, *overrides], settings)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def set_files(folder: Path) -> dict[str, bytes]:
    """Every file of a set, by relative path: equal before and after means untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("raw") / "pairs.parquet", 6, seed=0)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory, ray_cluster) -> Path:
    output = tmp_path_factory.mktemp("prepared") / "set"
    prepare(config_for(raw, output))
    return output


@pytest.fixture
def prepared_copy(prepared, tmp_path) -> Path:
    copy = tmp_path / "set"
    shutil.copytree(prepared, copy)
    return copy


def fake_staged_set(out: StagedOutput, tag: str) -> None:
    """What a job assembles in its staging folder, in miniature."""
    (out.new / "shards").mkdir(exist_ok=True)
    (out.new / "shards" / "shard-00000.parquet").write_text(tag)
    (out.new / "rejects.parquet").write_text(tag)


def complete_set(folder: Path, tag: str) -> dict:
    with StagedOutput(folder, overwrite=True, job="prepared set", owned=("rejects.parquet",)) as out:
        fake_staged_set(out, tag)
        return out.finish({"kind": "prepared_set", "tag": tag})


# --- item 1: nothing a user made is deleted ---------------------------------------------------


def test_item1_an_input_under_the_output_folder_is_refused_up_front_and_kept(tmp_path, ray_cluster):
    output = tmp_path / "out"
    raw = write_pairs(output / "shards" / "in.parquet", 2, seed=0)  # the case: input under OUTPUT/shards
    before = raw.read_bytes()
    with pytest.raises(OutputError, match="input .* is inside the output folder"):
        prepare(config_for(raw, output))
    assert raw.read_bytes() == before and names(output) == ["shards"]
    with pytest.raises(OutputError, match="inside the output folder"):
        prepare(config_for(output, output))  # the output folder itself as input

    inputs = tmp_path / "inputs"
    write_pairs(inputs / "a.parquet", 2, seed=0)
    with pytest.raises(OutputError, match="output folder .* is inside the input folder"):
        prepare(config_for(inputs, inputs / "prepared"))  # the next run would read the shards as input
    assert names(inputs) == ["a.parquet"]
    assert prepare_latents.main(["--input", str(raw), "--output", str(output)]) == 2


def test_item1_files_without_our_marker_are_never_deleted(tmp_path):
    folder = tmp_path / "out"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "mine.parquet").write_bytes(b"user shard")
    (folder / "rejects.parquet").write_bytes(b"user rejects")
    (folder / "empty_prompt.safetensors").write_bytes(b"user tensors")
    (folder / ".staging-notes").mkdir()
    (folder / ".staging-notes" / "draft.txt").write_text("user notes")
    forged = folder / ".staging-0123"  # a marker, but not this tool's
    forged.mkdir()
    (forged / MARKER).write_text(json.dumps({"tool": "something else", "run_id": "0123"}))
    before = set_files(folder)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"did not write .*\.staging-0123.*\.staging-notes.*empty_prompt"
                                              r".*rejects.parquet.*shards.*no manifest.json.*nothing was deleted"):
            StagedOutput(folder, overwrite=overwrite, job="prepared set", owned=("rejects.parquet",))
    assert set_files(folder) == before
    assert names(folder) == [".staging-0123", ".staging-notes", "empty_prompt.safetensors", "rejects.parquet",
                             "shards"], "no lock file or staging folder is left behind either"

    (folder / "manifest.json").write_text(json.dumps({"rows": 3}))  # not a manifest this tool wrote
    with pytest.raises(OutputError, match="did not write .*manifest.json"):
        StagedOutput(folder, overwrite=True, job="prepared set")
    assert set_files(folder) == {**before, "manifest.json": b'{"rows": 3}'}


def test_item1_only_leftovers_that_carry_our_marker_are_removed(tmp_path, caplog):
    folder = tmp_path / "out"
    dead = StagedOutput(folder, overwrite=False, job="prepared set")
    marker = json.loads((dead.staging / MARKER).read_text())
    assert marker["tool"] == output_module.TOOL and marker["job"] == "prepared set"
    assert marker["run_id"] == dead.run_id and marker["pid"] == os.getpid() and marker["state"] == "writing"
    (dead.staging / "parts").mkdir()
    (dead.staging / "parts" / "half.parquet").write_bytes(b"half")
    dead._lock.release()  # its process died: the kernel drops the lock, the staging folder stays
    (folder / ".staging-empty").mkdir()  # a run that died before writing its marker: empty, nothing to lose
    with caplog.at_level(logging.WARNING), StagedOutput(folder, overwrite=False, job="prepared set") as out:
        assert names(folder) == [LOCK_FILE, out.staging.name]
        out.finish({"kind": "prepared_set"})
    assert f"removing .staging-{dead.run_id}" in caplog.text
    assert names(folder) == ["manifest.json"]


# --- item 2: --overwrite swaps the new set in only when it is complete --------------------------


def test_item2_an_interrupted_overwrite_leaves_the_old_set_complete_and_usable(prepared_copy, raw, monkeypatch):
    old_manifest, old_files = read_manifest(prepared_copy), set_files(prepared_copy)
    old_ids = sorted(read_rows(prepared_copy, ["id"])["id"])
    seen = {}

    def interrupted(out, results):
        # Every row of the new set is written (staged): the old set is still complete and readable ...
        seen["staged"] = sorted(p.name for p in (out.staging / "parts" / "shards").iterdir())
        seen["manifest"] = read_manifest(prepared_copy)
        seen["ids"] = sorted(read_rows(prepared_copy, ["id"])["id"])
        raise KeyboardInterrupt  # ... when Ctrl-C arrives

    monkeypatch.setattr(prepare_latents, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(config_for(raw, prepared_copy, "storage.latent_dtype=float16", overwrite=True))
    assert seen["staged"] and seen["manifest"] == old_manifest and seen["ids"] == old_ids
    assert set_files(prepared_copy) == old_files, "the old set is untouched, no staging folder or lock is left"

    monkeypatch.undo()
    manifest = prepare(config_for(raw, prepared_copy, "storage.latent_dtype=float16", overwrite=True))
    assert read_manifest(prepared_copy) == manifest and manifest["latent_dtype"] == "float16"
    assert manifest["owner"]["entries"] == ["shards", "rejects.parquet", "empty_prompt.safetensors"]
    assert names(prepared_copy) == ["empty_prompt.safetensors", "manifest.json", "rejects.parquet", "shards"]
    assert sorted(p.name for p in (prepared_copy / "shards").iterdir()) == [
        Path(s["file"]).name for s in manifest["shards"]], "only the new set's shards"
    assert read_rows(prepared_copy, ["latent"])["latent"].dtype.name == "float16"


def test_item2_an_interrupt_inside_the_swap_finishes_it(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    complete_set(folder, "old")
    moves = {"n": 0}
    real_move = output_module._move

    def interrupted_once(source, target):
        moves["n"] += 1
        if moves["n"] == 3:  # the old manifest and shards are out, the new ones not yet in
            raise KeyboardInterrupt
        real_move(source, target)

    monkeypatch.setattr(output_module, "_move", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        complete_set(folder, "new")
    assert read_manifest(folder)["tag"] == "new" and (folder / "shards" / "shard-00000.parquet").read_text() == "new"
    assert names(folder) == ["manifest.json", "rejects.parquet", "shards"]


def test_item2_a_swap_killed_halfway_is_finished_by_the_next_run(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "out"
    complete_set(folder, "old")
    real_move, moves = output_module._move, {"n": 0}

    def killed(source, target):  # the process dies at the third move: nothing after it happens
        moves["n"] += 1
        if moves["n"] >= 3:
            raise SystemExit("killed")
        real_move(source, target)

    monkeypatch.setattr(output_module, "_move", killed)
    with pytest.raises(SystemExit):
        complete_set(folder, "new")
    assert not (folder / "manifest.json").exists(), "halfway: neither set is complete in the folder ..."
    staging = next(folder.glob(".staging-*"))
    assert json.loads((staging / MARKER).read_text())["state"] == "committing"  # ... and the marker says so
    monkeypatch.setattr(output_module, "_move", real_move)
    with caplog.at_level(logging.WARNING), pytest.raises(OutputError, match="already holds a complete"):
        StagedOutput(folder, overwrite=False, job="prepared set")
    assert "finishing that swap" in caplog.text
    assert read_manifest(folder)["tag"] == "new" and (folder / "rejects.parquet").read_text() == "new"
    assert names(folder) == ["manifest.json", "rejects.parquet", "shards"]


@pytest.mark.slow
def test_item2_sigint_to_the_cli_leaves_the_old_set(prepared_copy, raw, ray_cluster):
    old_files = set_files(prepared_copy)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    job = subprocess.Popen([sys.executable, "-m", "data_pipelines.prepare_latents", "--input", str(raw),
                            "--output", str(prepared_copy), "--overwrite", *FAST, "storage.latent_dtype=float16"],
                           env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(prepared_copy.glob(".staging-*")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, f"the job ended before staging began: {job.stderr.read()}"
        job.send_signal(signal.SIGINT)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert set_files(prepared_copy) == old_files


# --- item 3: one job per output folder ------------------------------------------------------------


def test_item3_a_second_job_on_the_same_output_fails_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "out"
    complete_set(folder, "old")
    with StagedOutput(folder, overwrite=True, job="prepared set", owned=("rejects.parquet",)) as first:
        fake_staged_set(first, "first")
        started = time.monotonic()
        holder = rf"in use by prepared set run {first.run_id} \(pid {os.getpid()} on host {socket.gethostname()}"
        with pytest.raises(OutputError, match=holder):
            StagedOutput(folder, overwrite=True, job="prepared set")
        assert time.monotonic() - started < 5, "at once, not after a wait"
        assert (first.staging / "set" / "shards" / "shard-00000.parquet").read_text() == "first", "staging intact"
        assert read_manifest(folder)["tag"] == "old"
        first.finish({"kind": "prepared_set", "tag": "first"})
    assert read_manifest(folder)["tag"] == "first" and not (folder / LOCK_FILE).exists()
    complete_set(folder, "next")  # released: the next job runs
    assert read_manifest(folder)["tag"] == "next"


def test_item3_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    script = ("import sys, time; from data_pipelines.output import FolderLock; "
              "lock = FolderLock(sys.argv[1], 'prepared set', 'r0').acquire(); print('locked', flush=True); "
              "time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=rf"in use by prepared set run r0 \(pid {holder.pid} on host"):
            StagedOutput(folder, overwrite=False, job="prepared set")
        with pytest.raises(OutputError, match="waited"):
            FolderLock(folder, "ShapeEval cache").acquire(wait=True, timeout_s=0.5)
    finally:
        holder.kill()
        holder.wait()
    with StagedOutput(folder, overwrite=False, job="prepared set") as out:  # no stale lock after a kill -9
        out.finish({"kind": "prepared_set"})
    assert names(folder) == ["manifest.json"]


def test_item3_two_prepare_jobs_on_one_output(prepared_copy, raw, monkeypatch):
    old_manifest = read_manifest(prepared_copy)
    real_commit, second = prepare_latents.commit, {}

    def commit_while_another_job_starts(out, results):
        with pytest.raises(OutputError, match=f"in use by prepared set run {out.run_id}") as refused:
            prepare(config_for(raw, prepared_copy, overwrite=True))
        second["error"], second["run_id"] = str(refused.value), out.run_id
        second["staging"] = sorted(p.name for p in (out.staging / "parts" / "shards").iterdir())
        return real_commit(out, results)

    monkeypatch.setattr(prepare_latents, "commit", commit_while_another_job_starts)
    manifest = prepare(config_for(raw, prepared_copy, overwrite=True))
    assert "wait for that job to finish, or choose another output folder" in second["error"]
    assert second["staging"], "the first job's staged shards were left alone"
    assert read_manifest(prepared_copy) == manifest != old_manifest and manifest["owner"]["run_id"] == second["run_id"]


def test_item3_trainings_on_a_cold_shapeeval_cache_wait_and_reuse_the_first_set(tmp_path, monkeypatch, ray_cluster):
    real_prepare, calls, other = shapeeval_set.prepare, [], {}
    args = (tmp_path / "cache", 8, 0, 32, "sana-tiny", "minilm", 32)

    def second_training():
        other["path"] = shapeeval_set.ensure_shapeeval_prepared(*args, wait_timeout_s=300)
        other["had_manifest"] = (other["path"] / "manifest.json").is_file()

    def counting_prepare(config):
        calls.append(config.output)
        if len(calls) == 1:  # the first training prepares: a second one starts on the cold cache meanwhile
            other["thread"] = threading.Thread(target=second_training)
            other["thread"].start()
            time.sleep(1.0)
        return real_prepare(config)

    monkeypatch.setattr(shapeeval_set, "prepare", counting_prepare)
    first = shapeeval_set.ensure_shapeeval_prepared(*args)
    other["thread"].join(timeout=300)
    assert other["path"] == first and other["had_manifest"]
    assert len(calls) == 1, "the second training reused the first one's set"
    assert read_manifest(first)["rows_in"] == 8 and not (first.parent / LOCK_FILE).exists()


# --- item 13: duplicate ids -----------------------------------------------------------------------


def _pairs_with_ids(folder: Path, files: dict[str, list[str]]) -> None:
    """Parquet files of ShapeEval images whose ``key`` column holds the given ids; captions say
    which file and row each came from; row groups of 2 rows (several read units)."""
    good = pq.read_table(write_pairs(folder.parent / "source.parquet", 8, seed=1)).to_pylist()
    for name, ids in files.items():
        table = pa.table({"key": ids, "image_bytes": [good[i]["image_bytes"] for i in range(len(ids))],
                          "text": [f"{name} row {i}" for i in range(len(ids))]})
        pq.write_table(table, folder / name, row_group_size=2)


def test_item13_duplicate_ids_are_rejects_counted_in_the_manifest(tmp_path, ray_cluster):
    folder = tmp_path / "raw"
    folder.mkdir()
    _pairs_with_ids(folder, {"a.parquet": ["x", "y", "x", "z"], "b.parquet": ["y", "w", "w", "v"]})
    manifest = prepare(config_for(folder, tmp_path / "out", "input.format=parquet", **{"input.id_column": "key"}))
    assert (manifest["rows_in"], manifest["rows_written"], manifest["rows_rejected"]) == (8, 5, 3)
    assert manifest["rejects_by_reason"] == {DUPLICATE_ID: 3}
    rows = read_rows(tmp_path / "out", ["id", "caption"])
    assert sorted(rows["id"]) == ["v", "w", "x", "y", "z"]
    assert dict(zip(rows["id"], rows["caption"])) == {  # the first row with an id keeps it
        "x": "a.parquet row 0", "y": "a.parquet row 1", "z": "a.parquet row 3", "w": "b.parquet row 1",
        "v": "b.parquet row 3"}
    rejects = sorted(pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist(), key=lambda r: r["source"])
    assert [(r["id"], r["source"], r["reason"]) for r in rejects] == [
        ("x", f"{folder / 'a.parquet'}#row=2", DUPLICATE_ID),
        ("y", f"{folder / 'b.parquet'}#row=0", DUPLICATE_ID),
        ("w", f"{folder / 'b.parquet'}#row=2", DUPLICATE_ID),
    ]
    assert f"already the id of {folder / 'a.parquet'}#row=1" in rejects[1]["detail"]


def test_item13_ids_are_checked_as_the_reader_makes_them(tmp_path):
    """A null id becomes ``<file>:<row>``, which an explicit id may repeat; the plan marks the
    later row in the unit (row group) that holds it."""
    file = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"key": ["a", None, "raw.parquet:1", "b", "a"], "image_bytes": [b"x"] * 5,
                             "text": ["t"] * 5}), file, row_group_size=2)
    plan = plan_input(InputConfig(path=str(file), format="parquet", id_column="key"))
    assert plan.duplicate_ids == 2
    assert [unit.get("duplicates", {}) for unit in plan.units] == [
        {}, {2: f"{file}#row=1"}, {4: f"{file}#row=0"}]
    unique = tmp_path / "unique.parquet"
    pq.write_table(pa.table({"key": [1, 2, 3], "image_bytes": [b"x"] * 3, "text": ["t"] * 3}), unique)
    assert plan_input(InputConfig(path=str(unique), format="parquet", id_column="key")).duplicate_ids == 0


def test_item13_the_fake_buffer_refuses_a_set_with_repeated_ids(prepared_copy, tmp_path):
    import torch

    from apex_ray.models import build_backbone
    from data_pipelines.fake_buffer import make_fake_buffer

    shard = prepared_copy / read_manifest(prepared_copy)["shards"][0]["file"]
    table = pq.read_table(shard)
    ids = table["id"].to_pylist()
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array([ids[0]] * len(ids)))
    pq.write_table(table, shard)  # a set made before repeated ids were set aside
    torch.manual_seed(0)
    build_backbone("sana-tiny", caption_channels=384).save_pretrained(tmp_path / "ckpt")
    config = FakeBufferConfig(checkpoint=str(tmp_path / "ckpt"), latents=str(prepared_copy),
                              output=str(tmp_path / "fake"))
    with pytest.raises(InputError, match=rf"{len(ids) - 1} rows repeat the id of an earlier row .*same noise"):
        make_fake_buffer(config)
    assert not (tmp_path / "fake").exists()
