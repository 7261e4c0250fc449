"""`ray job submit ... -- python jobs/serve.py ARGS`: `refseg serve ARGS` on the cluster the job was submitted to.

The job serves until it is stopped (`ray job stop ID`), which removes the application; for a service
that outlives any job, `serve deploy cluster/serve.yaml` instead."""

import sys

import ray

from refseg.cli import main

if __name__ == "__main__":
    ray.init()  # attach to the running cluster; never start a new one
    sys.exit(main(["serve", *sys.argv[1:]]))
