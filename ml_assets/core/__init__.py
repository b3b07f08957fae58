"""The core: every stage of the product as plain Python, with no Dagster import anywhere below here.

One module per stage (spec, ingest, validate, dataset, features, train, evaluate, registry, promotion,
drift, performance, retrain_policy, serve), over a shared bottom (errors, sql, hashing, store). The
orchestration package turns these functions into assets, checks, jobs, sensors and schedules; a test
proves that importing any module here leaves `dagster` unimported.
"""
