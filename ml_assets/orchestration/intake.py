"""The landing intake: the run the landing sensor requests for entries it detected (by name, size and
modification time). It hashes, reads and checks them and records each in the ledger: checked (with the
partitions it touches), rejected or ignored with the reason. The sensor then requests the load of the
checked contents over exactly those partitions (sensors.landing_sensor)."""

from pathlib import Path

import dagster as dg

from ml_assets.core import ingest
from ml_assets.core.ingest.ledger import content_holders, intake, ledger_names
from ml_assets.core.spec import Project
from ml_assets.orchestration.resources import ArtifactStore, Warehouse

INTAKE_JOB = "landing_intake_job"
INTAKE_OP = "landing_intake"


class IntakeConfig(dg.Config):
    files: dict[str, list[str]]  # landing source -> names of the entries detected in its folder


def intake_run_config(files: dict[str, list[str]]) -> dict:
    return {"ops": {INTAKE_OP: {"config": {"files": files}}}}


def intake_job(project: Project) -> dg.JobDefinition:
    landing = {n: s for n, s in project.sources.items() if s.landing}

    @dg.op(name=INTAKE_OP, description="Hash, read and check newly landed files; record each in the ledger.")
    def _intake(
        context: dg.OpExecutionContext, config: IntakeConfig, warehouse: Warehouse, artifacts: ArtifactStore
    ) -> None:
        unknown = sorted(set(config.files) - set(landing))
        if unknown:
            raise dg.Failure(
                f"landing intake: {unknown} are not landing sources; landing sources: {sorted(landing)}"
            )
        for name, names in config.files.items():
            with warehouse.get_connection() as conn:
                holders, known = content_holders(conn, name), ledger_names(conn, name)
            # Read outside the warehouse connection: a large file must not hold the write lock.
            folder = ingest.landing_dir(Path(artifacts.root), name)
            rows = intake(name, landing[name], folder, set(names), holders, known)
            with warehouse.get_connection() as conn:
                ingest.record_files(conn, name, rows, context.run.run_id)
            for row in rows:  # a rejection's reason names the file
                if row["status"] == "rejected":
                    context.log.warning(str(row["reason"]))
                else:
                    context.log.info(f"{row['status']} {row['file']} {row['reason']}".rstrip())

    @dg.job(
        name=INTAKE_JOB,
        description="Check files the landing_zone sensor detected and record them in the ledger; the sensor "
        "then requests the load of the checked ones (landing_ingest_job).",
    )
    def _job() -> None:
        _intake()

    return _job
