"""Experiment tracking: a small `Tracker` protocol, its MLflow implementation and a null one for unit tests.

This is the one module that imports mlflow. Default store: a SQLite database and an artifact folder under the
per-user data dir (``loupe.core.paths.data_dir()``); ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` point at a
server instead. Models are logged as plain files (safetensors + weight-spec JSON), never pickles, and registered
in the MLflow model registry so that ``models:/NAME@alias`` resolves to them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loupe.core.errors import TrackingError
from loupe.core.paths import data_dir

log = logging.getLogger(__name__)

MODEL_ARTIFACT_DIR = "model"
WEIGHTS_SHA_TAG = "weights_sha256"
#: Tags naming the process that owns a run, so a later start can close runs whose process died (SIGKILL).
PID_TAG, HOST_TAG = "loupe.pid", "loupe.host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _check_registered_sha(folder: Path, registered: str, uri: str) -> None:
    """Refuse a downloaded model whose weights are not the ones registered (tampered store or artifact)."""
    from loupe.core.io.identity import file_sha256
    from loupe.core.models.weights import find_weights_file

    actual = file_sha256(find_weights_file(folder))
    if actual != registered:
        raise TrackingError(
            f"{uri}: the downloaded weights have SHA-256 {actual[:12]}… but {registered[:12]}… was recorded when the "
            f"version was registered; the artifact store was changed. Re-register the model from a trusted copy"
        )


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<data_dir>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{data_dir() / 'mlflow.db'}"


class Run(Protocol):
    run_id: str

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_model_dir(self, local_dir: str | Path) -> str: ...


class Tracker(Protocol):
    uri: str

    def run(
        self, name: str, experiment: str, tags: dict[str, str] | None = None
    ) -> contextlib.AbstractContextManager[Run]: ...

    def register_model(self, name: str, run_id: str, alias: str | None = None) -> str: ...
    def set_alias(self, name: str, version: str, alias: str) -> None: ...
    def resolve_model_uri(self, uri: str, dst: str | Path) -> Path: ...
    def model_version(self, uri: str) -> tuple[str | None, str | None]: ...
    def registered_models(self) -> list[dict[str, Any]]: ...


# ----------------------------------------------------------------------------------------------------- null tracker
@dataclass
class NullRun:
    """Keeps everything in memory so unit tests can assert what would have been logged."""

    run_id: str = "null"
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int | None, float]]] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(f"{artifact_path + '/' if artifact_path else ''}{Path(path).name}")

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.artifacts.append(name)

    def log_figure(self, figure: Any, name: str) -> None:
        self.artifacts.append(name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_model_dir(self, local_dir: str | Path) -> str:
        self.artifacts.append(MODEL_ARTIFACT_DIR)
        return f"null:{MODEL_ARTIFACT_DIR}"


class NullTracker:
    uri = "null:"

    def __init__(self) -> None:
        self.runs: list[NullRun] = []

    @contextlib.contextmanager
    def run(self, name: str, experiment: str, tags: dict[str, str] | None = None) -> Iterator[NullRun]:
        r = NullRun(run_id=f"null-{len(self.runs)}", tags=dict(tags or {}))
        self.runs.append(r)
        yield r

    def register_model(self, name: str, run_id: str, alias: str | None = None) -> str:
        return "1"

    def set_alias(self, name: str, version: str, alias: str) -> None:
        return None

    def resolve_model_uri(self, uri: str, dst: str | Path) -> Path:
        raise TrackingError(f"{uri!r} needs the MLflow model registry; tracking is off (drop --no-track)")

    def model_version(self, uri: str) -> tuple[str | None, str | None]:
        raise TrackingError(f"{uri!r} needs the MLflow model registry; tracking is off (drop --no-track)")

    def registered_models(self) -> list[dict[str, Any]]:
        raise TrackingError("the model registry needs an MLflow store; tracking is off (drop --no-track)")


# --------------------------------------------------------------------------------------------------- mlflow tracker
class MlflowRun:
    def __init__(self, client: Any, run_id: str):
        self._client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k)[:250], _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), ts, step or 0)
            for k, v in metrics.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self._client.log_dict(self.run_id, data, name)

    def log_figure(self, figure: Any, name: str) -> None:
        self._client.log_figure(self.run_id, figure, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_model_dir(self, local_dir: str | Path) -> str:
        """Upload a model folder (weights.safetensors + weight_spec.json) as the run's ``model`` artifact."""
        self._client.log_artifacts(self.run_id, str(local_dir), MODEL_ARTIFACT_DIR)
        return f"runs:/{self.run_id}/{MODEL_ARTIFACT_DIR}"


class MlflowTracker:
    """Tracker over an MLflow store; ``uri`` defaults to the local SQLite store."""

    def __init__(self, uri: str | None = None):
        import mlflow  # noqa: F401 - fail here, early, if mlflow is missing
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_tracking_uri()
        self._artifact_root = None
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            self._artifact_root = db.parent.absolute() / "mlartifacts"  # a relative sqlite:///runs/x.db works too
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (self._artifact_root / name).as_uri() if self._artifact_root else None
        return self.client.create_experiment(name, artifact_location=location)

    def _close_orphans(self, exp_id: str) -> None:
        """Runs of this experiment left RUNNING by a process of this host that is gone (SIGKILL, power loss):
        marked KILLED, so the store never shows a dead job as running."""
        me = socket.gethostname()
        for r in self.client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=200):
            pid, host = r.data.tags.get(PID_TAG), r.data.tags.get(HOST_TAG)
            if host == me and pid and pid.isdigit() and not _alive(int(pid)):
                self.client.set_terminated(r.info.run_id, status="KILLED")
                log.warning("MLflow run %s (%s) was left running by process %s, which is gone: marked KILLED",
                            r.info.run_id, r.info.run_name, pid)  # fmt: skip

    @contextlib.contextmanager
    def run(self, name: str, experiment: str, tags: dict[str, str] | None = None) -> Iterator[MlflowRun]:
        try:
            exp_id = self._experiment_id(experiment)
            self._close_orphans(exp_id)
            owner = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
            mlrun = self.client.create_run(exp_id, run_name=name, tags={**dict(tags or {}), **owner})
        except Exception as exc:  # noqa: BLE001 - any store failure becomes one clear error
            raise TrackingError(
                f"could not start an MLflow run at {self.uri!r}: {exc}. Check --tracking-uri / MLFLOW_TRACKING_URI"
            ) from exc
        run = MlflowRun(self.client, mlrun.info.run_id)
        status = "FINISHED"
        try:
            yield run
        except BaseException:
            status = "KILLED" if isinstance(sys_exc(), (KeyboardInterrupt, SystemExit)) else "FAILED"
            raise
        finally:
            self.client.set_terminated(run.run_id, status=status)

    def register_model(self, name: str, run_id: str, alias: str | None = None) -> str:
        """Register the run's ``model`` artifact as a new version of ``name``; returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_DIR}"
        mv = self.client.create_model_version(name, source=source, run_id=run_id)
        sha = self._artifact_weights_sha(run_id)
        if sha:  # recorded at registration, checked again on every download (resolve_model_uri)
            self.client.set_model_version_tag(name, mv.version, WEIGHTS_SHA_TAG, sha)
        if alias:
            self.set_alias(name, mv.version, alias)
        return str(mv.version)

    def set_alias(self, name: str, version: str, alias: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def resolve_model_uri(self, uri: str, dst: str | Path) -> Path:
        """Download ``models:/NAME@alias``, ``models:/NAME/VERSION`` or ``runs:/ID/model`` into ``dst``."""
        from mlflow.exceptions import MlflowException

        try:
            if uri.startswith("models:/"):
                ref = uri.removeprefix("models:/")
                if "@" in ref:
                    name, alias = ref.split("@", 1)
                    mv = self.client.get_model_version_by_alias(name, alias)
                else:
                    name, _, version = ref.partition("/")
                    mv = self.client.get_model_version(name, version)
                run_id, path = mv.run_id, MODEL_ARTIFACT_DIR
                registered_sha = (mv.tags or {}).get(WEIGHTS_SHA_TAG)
            elif uri.startswith("runs:/"):
                run_id, _, path = uri.removeprefix("runs:/").partition("/")
                registered_sha = None
            else:
                raise TrackingError(f"{uri!r} is not an MLflow model URI; use models:/NAME@ALIAS or runs:/ID/model")
            Path(dst).mkdir(parents=True, exist_ok=True)
            # MLflow draws its own download bar on stderr; ours is the only progress a user should see
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            local = self.client.download_artifacts(run_id, path or MODEL_ARTIFACT_DIR, str(dst))
        except MlflowException as exc:
            raise TrackingError(
                f"could not resolve {uri!r} in the MLflow store {self.uri!r}: {exc.message}. "
                f"List registered models with `loupe models registered`."
            ) from None
        if registered_sha:
            _check_registered_sha(Path(local), registered_sha, uri)
        return Path(local)

    def _artifact_weights_sha(self, run_id: str) -> str | None:
        """The weights SHA-256 the run's model spec recorded (None for a model saved before it was recorded)."""

        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory(prefix="loupe-register-") as tmp:
            try:
                spec = self.client.download_artifacts(run_id, f"{MODEL_ARTIFACT_DIR}/weight_spec.json", tmp)
                return json.loads(Path(spec).read_text()).get("weights_sha256")
            except (MlflowException, OSError, ValueError):
                return None

    def model_version(self, uri: str) -> tuple[str | None, str | None]:
        """(registered name, version) behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; run id for runs:/."""
        from mlflow.exceptions import MlflowException

        if uri.startswith("runs:/"):
            return None, "run:" + uri.removeprefix("runs:/").partition("/")[0]
        name, sep, alias = uri.removeprefix("models:/").partition("@")
        if not sep:
            name, _, version = name.partition("/")
            return name, version
        try:
            return name, str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            raise TrackingError(f"could not read the version behind {uri!r}: {exc.message}") from None

    def registered_models(self) -> list[dict[str, Any]]:
        """Every registered model version with its aliases and run, newest first within a name."""
        out = []
        for rm in self.client.search_registered_models():
            aliases: dict[str, list[str]] = {}
            for alias, version in (rm.aliases or {}).items():
                aliases.setdefault(str(version), []).append(alias)
            versions = self.client.search_model_versions(f"name='{rm.name}'")
            for mv in sorted(versions, key=lambda m: -int(m.version)):
                out.append(
                    {
                        "name": rm.name,
                        "version": str(mv.version),
                        "aliases": sorted(aliases.get(str(mv.version), [])),
                        "run_id": mv.run_id,
                    }
                )
        return out

    # ------------------------------------------------------------------------------------ reading runs back
    def runs(self, domain: str | None = None, max_results: int = 500) -> list[dict[str, Any]]:
        """Runs of every experiment (of one domain: tag ``domain``), newest first, as plain dicts: ``run_id``,
        ``name``, ``experiment``, ``status``, ``start_time`` (ms), ``tags``, ``params``, ``metrics``."""
        experiments = {e.experiment_id: e.name for e in self.client.search_experiments()}
        if not experiments:
            return []
        where = f"tags.domain = '{domain}'" if domain else ""
        found = self.client.search_runs(list(experiments), filter_string=where, max_results=max_results,
                                        order_by=["attributes.start_time DESC"])  # fmt: skip
        return [
            {"run_id": r.info.run_id, "name": r.info.run_name, "experiment": experiments.get(r.info.experiment_id),
             "status": r.info.status, "start_time": r.info.start_time, "tags": dict(r.data.tags),
             "params": dict(r.data.params), "metrics": dict(r.data.metrics)}
            for r in found
        ]  # fmt: skip

    def artifacts(self, run_id: str, path: str = "") -> list[str]:
        """Paths of every artifact file of a run under ``path``, recursively."""
        out = []
        for f in self.client.list_artifacts(run_id, path or None):
            out += self.artifacts(run_id, f.path) if f.is_dir else [f.path]
        return out

    def download(self, run_id: str, path: str, dst: str | Path) -> Path:
        """One artifact of a run, downloaded into ``dst``."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))

    def promote(self, name: str, version: str, alias: str, reason: str, by: str) -> dict[str, Any]:
        """Point ``alias`` of ``name`` at ``version`` and record who did it, when, why and what it replaced as a tag
        of the version (``loupe.promotion.<alias>``); returns that record."""
        import datetime as dt

        from mlflow.exceptions import MlflowException

        if not reason.strip() or not by.strip():
            raise TrackingError("a promotion needs a reason and the name of who promotes")
        try:
            previous = str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            previous = None
        record = {"alias": alias, "version": str(version), "previous_version": previous, "reason": reason.strip(),
                  "by": by.strip(), "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}  # fmt: skip
        try:
            self.client.set_registered_model_alias(name, alias, str(version))
            self.client.set_model_version_tag(name, str(version), f"loupe.promotion.{alias}", json.dumps(record))
        except MlflowException as exc:
            raise TrackingError(f"could not promote {name} v{version} to @{alias}: {exc.message}") from None
        return record

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(name, str(version)).tags)

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)


def sys_exc() -> BaseException | None:
    import sys

    return sys.exc_info()[1]


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def make_tracker(uri: str | None = None, *, enabled: bool = True) -> Tracker:
    """The MLflow tracker at ``uri`` (default store when None), or a `NullTracker` when disabled."""
    return MlflowTracker(uri) if enabled else NullTracker()


def temp_model_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="loupe-model-")
