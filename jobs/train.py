"""`ray job submit ... -- python jobs/train.py --config configs/refcoco_r101.yaml [--output-dir DIR] [k=v ...]`

Connects to the running cluster (inside a Ray job, plain ``ray.init()`` attaches to it) and never
starts its own; outputs go to ``train.storage_path`` (shared FS or s3://) and ``--output-dir``.
"""

import sys

import ray

from refseg.cli import main

if __name__ == "__main__":
    ray.init()  # the cluster this job was submitted to
    sys.exit(main(["train", *sys.argv[1:]]))
