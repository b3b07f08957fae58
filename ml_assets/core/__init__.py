"""The core: every stage of the product as plain Python, with no Dagster import anywhere below here.

One module or package per stage (ingest, validate, dataset, features, tuning, train, evaluate, serving,
promotion, rollback, drift, performance, retrain_policy), over a shared bottom (errors, sql, hashing,
store, spec, registry, check_results); a stage imports earlier stages only (docs/design.md). The
orchestration package turns these functions into assets, checks, jobs, sensors and schedules; a test
proves that importing any module here leaves `dagster` unimported.
"""
