# The refseg image: Ray's official GPU image (CUDA, Python 3.11, ray[default] 2.60.0) + refseg and its
# dependencies. Every node of cluster/aws.yaml, cluster/gcp.yaml and the KubeRay manifests runs it.
#
#   docker build -t ghcr.io/your-org/refseg:0.1.0 .
#   docker push ghcr.io/your-org/refseg:0.1.0
#
# The base tag pins the Ray version (it must equal the Ray of every client that submits jobs:
# rayVersion in the KubeRay manifests, `ray` on your laptop) and the Python version.
FROM rayproject/ray:2.60.0-py311-gpu

# torch from PyPI ships its own CUDA runtime (only the host's NVIDIA driver is needed). Pin a CUDA
# build with e.g. --build-arg TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128"
ARG TORCH="torch>=2.4 torchvision>=0.19"

ENV TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# DS_ACCELERATOR stays unset: DeepSpeed detects CUDA (refseg sets DS_ACCELERATOR=cpu only for
# train.use_gpu=false runs).

WORKDIR /home/ray/refseg

# The image's Ray stays as it is: every install is constrained to the installed version.
RUN python -c "import ray; print(f'ray=={ray.__version__}')" > /home/ray/ray-constraint.txt \
 && pip install -c /home/ray/ray-constraint.txt ${TORCH}

# Dependencies first (cached while only the code changes), then the package itself.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users refseg ./refseg
RUN pip install -c /home/ray/ray-constraint.txt . \
 && python -c "import refseg.cli, deepspeed, pycocotools, transformers" \
 && refseg --help > /dev/null

# Entrypoints and settings (jobs/train.py ... --config configs/...): the KubeRay RayJob runs them
# from here; `ray job submit --working-dir .` ships your own checkout on top instead.
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users tune ./tune
COPY --chown=ray:users cluster ./cluster
