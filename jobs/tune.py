"""`ray job submit ... -- python jobs/tune.py ARGS`: `refseg tune ARGS` on the cluster the job was submitted to."""

import sys

import ray

from refseg.cli import main

if __name__ == "__main__":
    ray.init()  # attach to the running cluster; never start a new one
    sys.exit(main(["tune", *sys.argv[1:]]))
