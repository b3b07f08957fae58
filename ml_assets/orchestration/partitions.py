"""The project's time axis as Dagster partitions, and run tags that make one run cover a range of them."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import dagster as dg

from ml_assets.core.ingest import TimeWindow
from ml_assets.core.spec import PartitionSpec, Project

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
PARTITION = "dagster/partition"


def partitions_def(spec: PartitionSpec) -> dg.TimeWindowPartitionsDefinition:
    cls = {
        "daily": dg.DailyPartitionsDefinition,
        "weekly": dg.WeeklyPartitionsDefinition,
        "monthly": dg.MonthlyPartitionsDefinition,
    }[spec.granularity]
    # Weeks begin on the start date's weekday (Dagster's default is Sunday).
    offset = {"day_offset": spec.start.isoweekday() % 7} if spec.granularity == "weekly" else {}
    return cls(start_date=str(spec.start), end_date=str(spec.end) if spec.end else None, **offset)


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make one run cover partitions first..last (partitioned assets run once, as a range)."""
    return {RANGE_START: first, RANGE_END: last}


def all_partitions_tags(project: Project) -> dict[str, str]:
    """Range tags covering every partition of the project's time axis (none when nothing is partitioned)."""
    if project.time_axis is None:
        return {}
    pdef = partitions_def(project.time_axis)
    return partition_range_tags(pdef.get_first_partition_key(), pdef.get_last_partition_key())


def range_tags_for(project: Project, first: dt.datetime, last: dt.datetime) -> dict[str, str]:
    """Range tags from the partition holding `first` to the one holding `last` (naive UTC times)."""
    if project.time_axis is None:
        return {}
    pdef = partitions_def(project.time_axis)
    return partition_range_tags(
        pdef.get_partition_key_for_timestamp(first.replace(tzinfo=dt.UTC).timestamp()),
        pdef.get_partition_key_for_timestamp(last.replace(tzinfo=dt.UTC).timestamp()),
    )


def pick_partitions_message(partitioned: list[str]) -> str:
    """What a user launching partitioned assets without partitions reads (run_window)."""
    named = ", ".join(partitioned[:5]) + (f" and {len(partitioned) - 5} more" if len(partitioned) > 5 else "")
    return (
        f"{named} {'is' if len(partitioned) == 1 else 'are'} partitioned: launch {'it' if len(partitioned) == 1 else 'them'} "
        "with partitions (in the UI: Materialize, then pick a partition range, e.g. all; on the command line: "
        "`ml-assets run`, which covers every partition landed so far)"
    )


def tagged_window(tags: Mapping[str, str], spec: PartitionSpec) -> TimeWindow | None:
    """The time window of the partitions a run's tags name (one partition or a range); None: the run names
    none. For steps that are not partitioned themselves (asset checks) and so have no partition context."""
    first, last = tags.get(RANGE_START, tags.get(PARTITION)), tags.get(RANGE_END, tags.get(PARTITION))
    if first is None or last is None:
        return None
    pdef = partitions_def(spec)
    return TimeWindow(
        start=pdef.time_window_for_partition_key(first).start.replace(tzinfo=None),
        end=pdef.time_window_for_partition_key(last).end.replace(tzinfo=None),
    )


def run_window(context: dg.AssetExecutionContext) -> TimeWindow:
    """The time window a partitioned step covers; one run may cover a range (single-run backfill)."""
    if not context.has_partition_key_range:
        # A launch without partitions (the launchpad, `dagster asset materialize` without --partition)
        # fails at its first partitioned step, before that step reads or writes anything; Dagster alone
        # would fail deep inside with an internal CheckError. Public Dagster has no way to refuse the run
        # before it starts (docs/design.md, "Launches without partitions"); the steps after this one are
        # skipped. The message names this step's assets (a step cannot see the rest of the run's graph
        # through public API) and how to launch them.
        named = sorted(k.to_user_string() for k in context.selected_asset_keys)
        raise dg.Failure(description=pick_partitions_message(named), allow_retries=False)
    tw = context.partition_time_window
    return TimeWindow(start=tw.start.replace(tzinfo=None), end=tw.end.replace(tzinfo=None))
