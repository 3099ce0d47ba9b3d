"""`system` samples as a backend files them: under which node, and under which names."""

from __future__ import annotations

from typing import Any

from trackd.sinks.base import RunInfo


def system_node(run: RunInfo, node: str) -> str | None:
    """The node a `system` sample is filed under in a backend: None for the run's first node.

    Samples of the node rank 0 runs on (or of a run that is not distributed) take the
    backend's plain system-metric names; every other node's carry its host name (as
    MLflow's `system/<node_id>/...` and W&B's node labels do), so the samples of two
    nodes, each with its own daemon feeding the same backend run, never share a key.
    """
    return None if run.rank in (None, 0) and run.host in (None, node) else node


def since_run_start(body: dict[str, Any]) -> dict[str, float]:
    """A sample's values with its counters since boot (disk I/O, network bytes) counted
    from the run's first sample instead (`since`), as the peers' own monitors count them.
    A counter lower than where the run started (the node rebooted) counts from boot."""
    values: dict[str, float] = body["values"]
    since: dict[str, float] = body.get("since") or {}
    if not since:
        return values
    return {
        key: value - since[key] if key in since and value >= since[key] else value
        for key, value in values.items()
    }


def system_values(
    values: dict[str, float],
    names: dict[str, tuple[str, float]],
    gpu_names: dict[str, tuple[str, float]],
) -> dict[str, float]:
    """A sample's values renamed for a backend: `names` maps trackd's node and process
    names, `gpu_names` those after `gpu.I.`, each to (the backend's name, with `{i}` for
    the GPU index; a factor for its unit). A name the backend has no place for is left out."""
    renamed: dict[str, float] = {}
    for key, value in values.items():
        if key.startswith("gpu."):
            index, _, rest = key[4:].partition(".")
            if rest in gpu_names and index.isdigit():
                name, factor = gpu_names[rest]
                renamed[name.format(i=index)] = value * factor
        elif key in names:
            name, factor = names[key]
            renamed[name] = value * factor
    return renamed
