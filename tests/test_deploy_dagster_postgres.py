"""The cluster's Dagster instance (deploy/dagster/dagster.yaml) on a real PostgreSQL.

Starts Debian's PostgreSQL (initdb + pg_ctl; `make system-deps` installs it where apt-get can) on a
free localhost port with password authentication, then: Dagster's own instance-config validation
passes, the instance loads with dagster-postgres storage, a small job runs and is recorded (run,
event log, schedule state, in Postgres' tables), and the code location loads with that instance.
Skips, naming why, only where no PostgreSQL server binaries are installed.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from dagster import DagsterInstance, job, op
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.scheduler.instigation import (
    InstigatorState,
    InstigatorStatus,
    InstigatorType,
    ScheduleInstigatorData,
)
from dagster._core.storage.dagster_run import DagsterRunStatus
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteInstigatorOrigin, RemoteRepositoryOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
from dagster_k8s import K8sRunLauncher
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from _service_harness import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY_INSTANCE = REPO / "deploy" / "dagster" / "dagster.yaml"


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


PG_BIN = _pg_bin()
pytestmark = pytest.mark.skipif(
    PG_BIN is None, reason="PostgreSQL server binaries not installed (apt-get install -y postgresql; make system-deps)"
)


class Postgres:
    """A throwaway cluster: initdb refuses root, so as root it runs as the `postgres` user."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        # Not under pytest's tmp_path: its parents are private to root, and the server may run as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                pytest.skip("running as root without runuser: initdb cannot be started as another user")
            self.as_user = [runuser, "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self.as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "dagster", "--auth=scram-sha-256", f"--pwfile={pwfile}",
                  "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        try:
            con = self.connect("postgres")
            con.autocommit = True  # CREATE DATABASE cannot run in a transaction
            con.cursor().execute("CREATE DATABASE dagster")
            con.close()
        except BaseException:
            self.stop()
            raise

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr}{done.stdout}\n{log}")

    def connect(self, db: str = "dagster"):
        return psycopg2.connect(host="127.0.0.1", port=self.port, user="dagster", password=self.password, dbname=db)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    assert PG_BIN is not None
    server = Postgres(PG_BIN)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def deploy_home(postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DAGSTER_HOME holding the deployment's dagster.yaml, its variables pointing at the test server."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_INSTANCE, home / "dagster.yaml")
    env = {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(postgres.port),
        "DAGSTER_PG_USER": "dagster",
        "DAGSTER_PG_PASSWORD": postgres.password,
        "DAGSTER_PG_DB": "dagster",
        "DAGSTER_K8S_NAMESPACE": "recsys",
        "DAGSTER_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "DAGSTER_COMPUTE_LOG_DIR": str(tmp_path / "compute_logs"),
        "RECSYS_HOME": str(tmp_path / "recsys_home"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return home


@op
def count_items() -> int:
    return 3


@op
def double(n: int) -> int:
    return 2 * n


@job
def tiny_job() -> None:
    double(count_items())


def test_instance_config_passes_dagsters_validation(deploy_home: Path, tmp_path: Path) -> None:
    config, _ = dagster_instance_config(str(deploy_home))
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    # The launcher's own schema (instantiating it needs a cluster's service account).
    checked = process_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, checked.errors
    assert checked.value["job_namespace"] == "recsys"
    # Every other configurable part is built, which validates its config against its class.
    with DagsterInstance.from_config(str(deploy_home)) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.run_coordinator.get_run_queue_config().max_concurrent_runs == 1
        assert isinstance(instance.compute_log_manager, LocalComputeLogManager)
        assert Path(instance.root_directory) == tmp_path / "artifacts"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dagster.yaml").write_text(
        DEPLOY_INSTANCE.read_text().replace("max_concurrent_runs:", "max_concurrent_run:")
    )
    with DagsterInstance.from_config(str(broken)) as instance, pytest.raises(Exception, match="max_concurrent_run"):
        instance.run_coordinator


def test_small_job_runs_and_is_recorded_in_postgres(deploy_home: Path, postgres: Postgres) -> None:
    with DagsterInstance.from_config(str(deploy_home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        result = tiny_job.execute_in_process(instance=instance)
        assert result.success and result.output_for_node("double") == 6
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == DagsterRunStatus.SUCCESS

        origin = RemoteInstigatorOrigin(
            RemoteRepositoryOrigin(
                InProcessCodeLocationOrigin(LoadableTargetOrigin(python_file=__file__)), "__repository__"
            ),
            "tiny_schedule",
        )
        instance.add_instigator_state(
            InstigatorState(origin, InstigatorType.SCHEDULE, InstigatorStatus.STOPPED, ScheduleInstigatorData("0 * * * *"))
        )
        assert [s.name for s in instance.all_instigator_state()] == ["tiny_schedule"]

    # Read back through Postgres itself, not Dagster's cache.
    with postgres.connect() as con, con.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (result.run_id,))
        assert cur.fetchall() == [("SUCCESS",)]
        cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = 'STEP_SUCCESS'",
                    (result.run_id,))
        assert cur.fetchall() == [(2,)]
        cur.execute("SELECT count(*) FROM jobs")
        assert cur.fetchall() == [(1,)]


def test_code_location_loads_with_the_deployment_instance(deploy_home: Path) -> None:
    started = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-m", "recsys_assets.definitions"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(deploy_home)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Validation successful" in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
    assert time.perf_counter() - started < 300
