"""Files from elsewhere are data, never code; ids never become paths; secrets never reach logs."""
from __future__ import annotations

import pytest
import torch

from apex_ray.engine.checkpointing import read_extra_state
from apex_ray.orchestration.tracking import redact_credentials
from apex_ray.sample import SampleError, read_dpg_prompts


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a crafted checkpoint would do on unpickling
        return (open, (str(self.marker), "w"))


def test_a_crafted_extra_state_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    crafted = tmp_path / "extra_rank0.pt"
    torch.save({"runner": Payload(marker)}, crafted)
    with pytest.raises(ValueError, match="not loaded"):
        read_extra_state(crafted)
    assert not marker.exists()
    real = tmp_path / "extra_rank1.pt"
    state = {"runner": {"step": 3, "noise_generator": torch.Generator().get_state(),
                        "buffer": {"capacity": 4, "entries": [(torch.ones(2), torch.zeros(1, 3), None)]}},
             "data": {"epoch": 1, "position": 2}, "world_size": 2}
    torch.save(state, real)
    loaded = read_extra_state(real)
    assert loaded["runner"]["step"] == 3 and torch.equal(loaded["runner"]["buffer"]["entries"][0][0], torch.ones(2))


@pytest.mark.parametrize("bad", ["../escape", "/abs/x", "a/b", "..", "", "a\\b"])
def test_dpg_prompt_ids_that_are_not_plain_file_names_are_refused(tmp_path, bad):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"ok_1": "a red circle", "%s": "a blue square"}' % bad.replace("\\", "\\\\"))
    with pytest.raises(SampleError, match="not a plain file name"):
        read_dpg_prompts(str(prompts))


def test_plain_dpg_ids_pass(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"ok_1": "a red circle", "0042": "a blue square"}')
    assert [p.name for p in read_dpg_prompts(str(prompts))] == ["ok_1", "0042"]


def test_credentials_in_uris_are_redacted():
    assert redact_credentials("https://user:s3cret@mlflow.example.com/api") == "https://***@mlflow.example.com/api"
    assert redact_credentials("http://token@host:5000") == "http://***@host:5000"
    assert redact_credentials("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact_credentials("see s3://key:secret@bucket/x and https://h/p") == "see s3://***@bucket/x and https://h/p"


def test_a_run_logs_no_credentials(tmp_path):
    """Params and tags that carry a URI with credentials are stored redacted."""
    from mlflow.tracking import MlflowClient

    from apex_ray.orchestration.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger.create(uri, "e", "r", {"remote": "https://u:tok@h/x"},
                              {"tracking.tracking_uri": "https://u:tok@h", "optim.lr": 1e-4})
    logger.set_tags({"checkpoint_path": "s3://k:secret@bucket/ckpt"})
    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.data.params["tracking.tracking_uri"] == "https://***@h"
    assert run.data.tags["remote"] == "https://***@h/x" and run.data.tags["checkpoint_path"] == "s3://***@bucket/ckpt"
    assert "tok" not in str(run.data.params) + str(run.data.tags) and "secret" not in str(run.data.tags)
