"""Reading a run directory: the records and ``env.json`` files under it, and which cells
its runs planned but never recorded. Reports, ``compare`` and ``--fastest-from`` read runs
through here."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from .config import UsageError
from .records import ENV, latest, read_records, run_files


def load_run(run_dir: str, skip_corrupt: bool = False) -> Tuple[List[dict], List[dict]]:
    """Records and env.json files of a run directory and its sub-directories.

    Hidden directories are not read (``.generations/`` holds the earlier runs
    that ``run --overwrite`` kept); within one records file the last record of
    a cell wins (``--retry-failed`` appends a cell's new record).
    """
    recs, envs = [], []
    for path in run_files(run_dir):
        where = os.path.relpath(os.path.dirname(path), run_dir)
        # The same cell may come from several runs (a sweep repeats the quick
        # preset's batch 25): tables name the run a row comes from.
        recs.extend(dict(r, run=r.get("run", where))
                    for r in latest(read_records(path, skip_corrupt=skip_corrupt)))
        env_path = os.path.join(os.path.dirname(path), ENV)
        if os.path.exists(env_path):
            with open(env_path, encoding="utf-8") as fh:
                try:
                    env = json.load(fh)
                except ValueError as exc:
                    raise UsageError("%s: not JSON (%s)" % (env_path, exc)) from None
            env["_dir"] = os.path.relpath(os.path.dirname(path), run_dir)
            envs.append(env)
    return recs, envs


def incomplete_runs(records: List[Dict], envs: List[Dict]) -> Dict[str, Tuple[int, int]]:
    """{framework: (cells recorded, cells planned)} for each framework whose run directory's
    env.json planned cells that have no record there (interrupted, or still running)."""
    out: Dict[str, Tuple[int, int]] = {}
    for env in envs:
        where = env.get("_dir", ".")
        for fw, ids in (env.get("planned_cells") or {}).items():
            planned = set(ids)
            have = {r.get("cell_id") for r in records
                    if r.get("run", ".") == where and r.get("framework") == fw}
            missing = planned - have
            if missing:
                done, total = out.get(fw, (0, 0))
                out[fw] = (done + len(planned) - len(missing), total + len(planned))
    return out
