from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from loupe.core.distributed import DistInfo, EpochRandomSampler, init_from_env, sampler_for, wrap_ddp

REPO = Path(__file__).resolve().parents[2]


def test_single_process_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_from_env()
    assert info == DistInfo() and info.is_main and not info.enabled
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, info, torch.device("cpu")) is model


def test_samplers_shard_and_repeat_by_epoch() -> None:
    ds = TensorDataset(torch.arange(10))
    shards = [list(sampler_for(ds, DistInfo(rank=r, world_size=2), shuffle=True, seed=1)) for r in range(2)]
    assert isinstance(sampler_for(ds, DistInfo(rank=0, world_size=2), shuffle=True), DistributedSampler)
    assert sorted(shards[0] + shards[1]) == list(range(10))
    s = EpochRandomSampler(ds, seed=4)
    first, again = list(s), list(s)
    s.set_epoch(1)
    assert first == again and list(s) != first and sorted(s) == list(range(10))


def _write_cfg(tmp_path: Path, shared_data: Path) -> Path:
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        f"""recipe: cxr.finetune
run: {{experiment: ddp-test, name: ddp, output_dir: {tmp_path / "out"}, tracking_uri: "sqlite:///{tmp_path}/ml.db"}}
data: {{source: pneumoniamnist, path: {shared_data / "cxr/pneumoniamnist/pneumoniamnist.npz"}, limit: 128,
        batch_size: 32}}
model: {{name: cxr_vit_micro_patch4, img_size: 28}}
optim: {{warmup_epochs: 0}}
train: {{epochs: 1, threads: 1, progress: false}}
eval: {{n_boot: 20}}
"""
    )
    return cfg


@pytest.mark.realdata
def test_ddp_finetune_with_two_cpu_processes_logs_one_run(tmp_path: Path, shared_data: Path) -> None:
    cfg = _write_cfg(tmp_path, shared_data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOUPE_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loupe.domains.cxr.run", str(cfg)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/ml.db")
    exp = client.get_experiment_by_name("ddp-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    m = runs[0].data.metrics
    assert "val_macro_auroc" in m and "test_macro_auroc" in m
    # both ranks trained, each on its half of the 128 films (2 steps of 32), and ended with the same weights
    assert m["ddp_world_size"] == 2 and m["ddp_steps_rank0"] == m["ddp_steps_rank1"] == 2
    assert m["ddp_samples_rank0"] == m["ddp_samples_rank1"] == 64 and m["ddp_replicas_in_sync"] == 1.0
    assert (tmp_path / "out" / "model" / "weights.safetensors").is_file()


def test_diverged_replicas_are_refused_by_name(tmp_path: Path) -> None:
    script = tmp_path / "diverge.py"
    script.write_text(
        "import torch\n"
        "from loupe.core.distributed import cleanup, init_from_env, replica_report, DistributedError\n"
        "info = init_from_env(torch.device('cpu'))\n"
        "model = torch.nn.Linear(3, 2)\n"
        "torch.nn.init.zeros_(model.weight)\n"
        "if info.rank == 1:\n    model.weight.data += 1e-3\n"
        "try:\n    replica_report(model, 5, 40, info)\n"
        "except DistributedError as exc:\n    print('REFUSED', info.rank, exc)\n"
        "cleanup(info)\n"  # leave the group as the recipes do: a rank exiting inside gloo's teardown can SIGABRT
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("REFUSED") == 2 and "DDP replicas diverged: 2 different weight sets" in proc.stdout
