"""Wall time of a preset on the local executor and on a local 3-node Ray cluster, alternated.

    python tests/perf/cluster_walltime.py [--rounds N] [--framework numpy] [--python PATH]
                                          [-- extra `bench run` options]

Run it as root with ray installed (the venv of ``nox -s tests_cluster``): it starts the
cluster of ``tests/test_cluster.py`` (head + two workers, one ``bench_slot`` each, in a
private network namespace), runs the smoke preset local, then on Ray, ``--rounds`` times,
and prints each wall time with the load average. ``--python`` is the interpreter that has
the framework (the local run's, and ``--node-python`` on the nodes). Three nodes on one
machine share its cores: this shows what the executor costs and overlaps, not what three
machines would measure.
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import test_cluster as tc  # noqa: E402
from bench.records import read_records  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--framework", default="numpy")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", default="/tmp/cluster-walltime")
    p.add_argument("extra", nargs="*")
    args = p.parse_args()
    cluster = tc.Cluster(tc._ray_bin())
    base = ["--preset", "smoke", "--frameworks", args.framework] + args.extra
    try:
        t0 = time.time()
        cluster.start()
        print("cluster started in %.1f s" % (time.time() - t0), flush=True)
        for i in range(args.rounds):
            for kind in ("local", "ray"):
                out = os.path.join(args.out, "%s-%s-%d" % (args.framework, kind, i))
                if kind == "local":
                    argv = [args.python, "-m", "bench", "run"] + base
                else:
                    argv = [sys.executable, "-m", "bench", "run"] + base + [
                        "--executor", "ray", "--address", cluster.address,
                        "--node-python", "%s=%s" % (args.framework, args.python)]
                argv += ["--out", out, "--overwrite"]
                load = os.getloadavg()[0]
                t0 = time.time()
                res = subprocess.run(cluster.cmd(argv), env=cluster.env(), cwd=tc.ROOT,
                                     capture_output=True, text=True, timeout=3600)
                wall = time.time() - t0
                ok = [r for r in read_records(os.path.join(out, "records.jsonl")) if r["status"] == "ok"]
                print("%s round %d: exit %d, %.1f s wall, load %.1f -> %.1f, %d timed cells "
                      "(cell wall %s s) on %s" % (
                          kind, i, res.returncode, wall, load, os.getloadavg()[0], len(ok),
                          sorted(round(r["cell_wall_s"], 1) for r in ok),
                          sorted((r.get("executor") or {}).get("node_ip", "this machine") for r in ok)),
                      flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
