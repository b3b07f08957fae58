"""The orchestration layer: the only package that imports Dagster. It turns pipeline specs into assets,
checks, jobs, sensors and schedules, each calling one function of `ml_assets.core`."""
