"""The Ray Data backend on a local Ray instance gives the same table as the local DataLoader backend."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from loupe.workflows.scoring import RayOptions, ScoreOptions, score


@pytest.fixture
def local_ray() -> object:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_and_local_backends_give_identical_tables(
    inputs: tuple[Path, dict], model_dir: Path, tmp_path: Path, local_ray: object, same_table
) -> None:
    root, files = inputs
    common = dict(domain="cxr", input=root, model=f"local-dir:{model_dir}", track=False, batch_size=4, explain=True)
    local = score(ScoreOptions(out=tmp_path / "local.parquet", num_workers=0, **common))
    on_ray = score(ScoreOptions(out=tmp_path / "ray.parquet", backend="ray", ray=RayOptions(actors=2), **common))
    assert (local.rows_ok, local.rows_failed) == (on_ray.rows_ok, on_ray.rows_failed) == (len(files["good"]), 2)
    me = f"{os.uname().nodename}:{os.getpid()}"
    assert list(local.workers) == [me]  # num_workers=0: the driver scored
    assert me not in on_ray.workers and sum(on_ray.workers.values()) == len(files["good"]) + 2  # Ray actors did

    a = pd.read_parquet(tmp_path / "local.parquet").sort_values("path").reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "ray.parquet").sort_values("path").reset_index(drop=True)
    for col in ("explain_path", "artifacts"):  # artifacts go beside each table
        a[col], b[col] = a[col].str.replace("local.parquet", "T"), b[col].str.replace("ray.parquet", "T")
    same_table(a, b, atol=1e-6)
    assert b.explain_path.notna().sum() == len(files["good"])
