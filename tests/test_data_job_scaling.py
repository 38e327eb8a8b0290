"""data_pipelines at scale: read and write tasks import only pyarrow and the reader / sink (not
torch, transformers, diffusers or the project's model code), read tasks at once are capped, the
actor pools are sized from the cluster, captions are encoded once per batch, and the job's
start-up / steady-rate split (issue 12, item 2)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from apex_ray.method.conditioning import Conditioning
from data_pipelines import actors, readers
from data_pipelines.config import InputConfig, load_prepare_config
from data_pipelines.prepare_latents import job_timing
from data_pipelines.readers import plan_input, read_input, read_units
from data_pipelines.resources import MIN_IO_TASKS, io_tasks, pool_sizes
from data_pipelines.sink import StagedShardSink

HEAVY = ("torch", "transformers", "diffusers", "safetensors", "apex_ray", "data_pipelines.config", "PIL")
"""Top-level packages (or modules) a read or write task must not import."""


def heavy(modules) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def raw_parquet(path: Path, rows: int, rows_per_group: int) -> Path:
    table = pa.table({"id": [f"r{i}" for i in range(rows)], "image_bytes": [b"x"] * rows,
                      "text": [f"caption {i % 3}" for i in range(rows)]})
    pq.write_table(table, path, row_group_size=rows_per_group)
    return path


def config(tmp_path: Path, *overrides: str):
    return load_prepare_config(None, list(overrides), {"input.path": str(tmp_path), "output": str(tmp_path / "out")})


# --- what the read and write tasks import ---------------------------------------------------------


def test_the_reader_and_the_sink_import_no_model_code():
    """In a fresh interpreter: what a read or write task's process imports to unpickle its function."""
    code = ("import sys, data_pipelines.readers, data_pipelines.sink, data_pipelines.resources; "
            "print(' '.join(sys.modules))")
    modules = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert "data_pipelines.readers" in modules and "pyarrow" in modules
    assert heavy(modules) == []


def test_a_read_task_in_a_fresh_ray_worker_loads_only_the_reader(tmp_path, ray_cluster):
    """The planned read task and the sink, unpickled and run in a new Ray worker process (a
    runtime_env of its own keeps other tests' workers out): the modules they add to a bare worker."""
    import cloudpickle
    import ray

    plan = plan_input(InputConfig(path=str(raw_parquet(tmp_path / "raw.parquet", 20, 8))))
    read_fn = readers.RawPairsDatasource(plan).get_read_tasks(1)[0].read_fn
    sink = StagedShardSink(str(tmp_path / "parts"), rows_per_shard=8)

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"APEX_TEST_FRESH_WORKER": "read-task-imports"}})
    def run_in_fresh_worker(pickled_read: bytes, pickled_sink: bytes) -> tuple[int, list[str]]:
        import sys as worker_sys
        from types import SimpleNamespace

        import cloudpickle as worker_pickle

        before = set(worker_sys.modules)
        tables = list(worker_pickle.loads(pickled_read)())
        worker_pickle.loads(pickled_sink).write(tables, SimpleNamespace(task_idx=0))
        return sum(t.num_rows for t in tables), sorted(set(worker_sys.modules) - before)

    rows, added = ray.get(run_in_fresh_worker.remote(cloudpickle.dumps(read_fn), cloudpickle.dumps(sink)))
    assert rows == 20
    assert "data_pipelines.readers" in added and "data_pipelines.sink" in added  # the probe did load them
    assert heavy(added) == [], heavy(added)


# --- bounded read and write concurrency ----------------------------------------------------------------


def test_io_tasks_grow_with_the_cluster_from_a_small_floor():
    assert io_tasks(0) == io_tasks(2) == io_tasks(16) == MIN_IO_TASKS == 2
    assert io_tasks(64) == 8 and io_tasks(1600) == 200


def test_read_input_plans_capped_zero_cpu_tasks_and_batch_sized_blocks(tmp_path, monkeypatch):
    """What read_input asks Ray Data for: no CPU per task (never behind the actor pools), at
    most ``io_tasks(cluster CPUs)`` at once, blocks of one batch."""
    asked = {}
    monkeypatch.setattr(readers.ray, "cluster_resources", lambda: {"CPU": 64.0})
    monkeypatch.setattr(readers.ray.data, "read_datasource", lambda source, **kwargs: asked.update(kwargs))
    plan = plan_input(InputConfig(path=str(raw_parquet(tmp_path / "raw.parquet", 1000, 100))))
    read_input(plan, block_rows=64)
    assert asked == {"num_cpus": 0.0, "concurrency": 8, "override_num_blocks": math.ceil(1000 / 64)}
    read_input(plan, concurrency=3)
    assert asked["concurrency"] == 3


def test_no_more_read_tasks_run_at_once_than_the_cap(tmp_path, ray_cluster, monkeypatch):
    """12 read tasks that each take 0.4 s, capped at 2: their run times never overlap by more than 2
    (uncapped, a 0-CPU task each gets a worker process at once)."""
    log = tmp_path / "spans"
    log.mkdir()
    real_read_units = read_units

    def slow_read_units(plan, units):  # nested, so Ray pickles it by value
        import os
        import time as worker_time

        started = worker_time.time()
        worker_time.sleep(0.4)
        yield from real_read_units(plan, units)
        (log / f"{os.getpid()}-{started}").write_text(f"{started} {worker_time.time()}")

    monkeypatch.setattr(readers, "read_units", slow_read_units)
    plan = plan_input(InputConfig(path=str(raw_parquet(tmp_path / "raw.parquet", 48, 4))))
    assert len(readers.RawPairsDatasource(plan).get_read_tasks(100)) == 12
    assert read_input(plan, concurrency=2, block_rows=4).materialize().count() == 48
    spans = [tuple(map(float, f.read_text().split())) for f in log.iterdir()]
    assert len(spans) == 12
    assert max_overlap(spans) <= 2


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


# --- actor pools sized from the cluster ----------------------------------------------------------------


def test_unset_pools_share_the_cluster_text_encoder_first(tmp_path):
    rows = 100_000
    # The benchmark's 2-core setting: one codec actor on a quarter, MiniLM actors of 0.75 CPU.
    bench = config(tmp_path, "codec.num_cpus=0.5", "text.num_cpus=0.75")
    assert pool_sizes(bench, {"CPU": 2.0}, rows) == {"codec": 1, "text": 2}
    # Defaults (1 CPU per actor) on 16 CPUs: a quarter decodes + encodes images, the rest captions.
    assert pool_sizes(config(tmp_path), {"CPU": 16.0}, rows) == {"codec": 4, "text": 12}
    # Always one actor per pool, even on a cluster too small for both (the job warns then).
    assert pool_sizes(config(tmp_path), {"CPU": 1.0}, rows) == {"codec": 1, "text": 1}


def test_configured_pools_are_kept_and_the_rest_gets_what_they_leave(tmp_path):
    rows = 100_000
    assert pool_sizes(config(tmp_path, "text.concurrency=3"), {"CPU": 16.0}, rows) == {"codec": 13, "text": 3}
    assert pool_sizes(config(tmp_path, "codec.concurrency=2", "text.concurrency=5"), {"CPU": 2.0}, rows) == {
        "codec": 2, "text": 5}
    # Decoding outside the codec actors (codec on a GPU) keeps one decode task's CPUs free.
    gpu = config(tmp_path, "codec.num_gpus=1", "codec.num_cpus=1", "text.num_gpus=1", "text.num_cpus=1")
    assert pool_sizes(gpu, {"CPU": 9.0, "GPU": 8.0}, rows) == {"codec": 2, "text": 6}


def test_a_resource_only_one_unset_pool_asks_for_is_all_its_own(tmp_path):
    gpu_codec = config(tmp_path, "codec.num_gpus=1", "codec.num_cpus=0.5")
    assert pool_sizes(gpu_codec, {"CPU": 16.0, "GPU": 4.0}, 100_000) == {"codec": 4, "text": 11}


def test_small_jobs_start_one_actor_per_pool(tmp_path):
    """A model load per actor is only worth a few batches: 31 rows in batches of 8 -> one each."""
    small = config(tmp_path, "codec.batch_size=8", "text.batch_size=8")
    assert pool_sizes(small, {"CPU": 64.0}, 31) == {"codec": 1, "text": 1}
    assert pool_sizes(small, {"CPU": 64.0}, 8 * 4 * 5) == {"codec": 5, "text": 5}
    # An actor that asks for no CPU or GPU is not sized by the cluster at all.
    assert pool_sizes(config(tmp_path, "text.num_cpus=0"), {"CPU": 64.0}, 100_000)["text"] == 1


# --- captions encoded once per batch ------------------------------------------------------------------


class CountingEncoder:
    """Stands in for MiniLM: a caption's embedding is its length; counts what it is asked to encode."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def encode(self, captions: list[str]) -> Conditioning:
        self.seen.append(list(captions))
        lengths = torch.tensor([float(len(c)) for c in captions])
        return Conditioning(lengths[:, None, None].expand(-1, 4, 2).clone(), torch.ones(len(captions), 4, dtype=torch.long),
                            lengths[:, None].clone())


def test_repeated_captions_in_a_batch_are_encoded_once(monkeypatch):
    encoder = CountingEncoder()
    monkeypatch.setattr(actors, "build_text_encoder", lambda *args, **kwargs: encoder)
    caption_encoder = actors.CaptionEncoder("minilm", None, max_length=6, text_dtype="float32")
    encoder.seen.clear()  # the empty prompt, encoded when the actor starts
    captions = ["a red circle", "a blue square", "a red circle", "a red circle", "a blue square", "a cat"]
    batch = {"caption": np.array(captions, dtype=object), "reason": np.array([""] * 6, dtype=object),
             "detail": np.array([""] * 6, dtype=object)}
    out = caption_encoder(batch)
    assert [sorted(call) for call in encoder.seen] == [sorted(set(captions))]  # 3 encoded, not 6
    assert out["pooled"][:, 0].tolist() == [float(len(c)) for c in captions]  # each row its own caption's
    assert out["text_embeds"].shape == (6, 6, 2) and out["text_mask"][:, 4:].sum() == 0  # padded to max_length


# --- start-up and steady rate from the write results ----------------------------------------------------


def test_job_timing_splits_start_up_from_the_steady_rate():
    started = 1000.0
    # First rows after 12 s, then 100 rows every second.
    results = [{"task": i, "finished_at": started + 12 + i, "shards": [(f"s{i}", 90)], "rejects": [(f"r{i}", 10)]}
               for i in range(5)]
    timing = job_timing(results, started)
    assert timing.first_rows_s == pytest.approx(12.0)
    assert timing.steady_rows_per_s == pytest.approx(100.0)
    assert timing.elapsed_s == pytest.approx(16.0)
    assert timing.startup_s == pytest.approx(16.0 - 500 / 100)
    assert job_timing([], started) is None
    assert job_timing(results[:1], started).steady_rows_per_s is None



def test_shards_keep_page_crcs_and_use_dictionaries_only_for_strings(tmp_path):
    """Tensor columns are written plain (a dictionary try costs a write task ~40% of its CPU for
    values that do not repeat); ids and captions keep theirs; every page carries its CRC."""
    from types import SimpleNamespace

    sink = StagedShardSink(str(tmp_path / "parts"), rows_per_shard=64)
    latents = np.random.default_rng(0).standard_normal((16, 3, 4, 4)).astype(np.float32)
    block = pa.table({"id": [f"r{i}" for i in range(16)], "caption": ["a red circle"] * 16,
                      "latent": pa.FixedShapeTensorArray.from_numpy_ndarray(latents)})
    result = sink.write([block], SimpleNamespace(task_idx=0))
    (name, rows), = result["shards"]
    assert rows == 16
    shard = pq.ParquetFile(tmp_path / "parts" / "shards" / name, page_checksum_verification=True)
    group = shard.metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    assert "RLE_DICTIONARY" in encodings["caption"] and "RLE_DICTIONARY" in encodings["id"]
    assert not any("DICTIONARY" in e for e in encodings["latent.list.element"]), encodings
    np.testing.assert_array_equal(shard.read()["latent"].combine_chunks().to_numpy_ndarray(), latents)
