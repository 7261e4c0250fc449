#!/usr/bin/env bash
# Submit a refseg job to a running Ray cluster with Ray's token authentication.
#
#   cluster/submit.sh [--address URL] [--k8s-secret NAME] [ray job submit options] -- ENTRYPOINT...
#
#   cluster/submit.sh -- python jobs/train.py --config configs/refcoco_r101.yaml --output-dir /mnt/shared/runs/r101
#   cluster/submit.sh --no-wait -- python jobs/evaluate.py --checkpoint ... --data-root ... --output ...
#   cluster/submit.sh --k8s-secret refseg -- python jobs/train.py ...      # KubeRay authOptions.mode=token
#
# Address: --address, else $RAY_ADDRESS, else http://127.0.0.1:8265 (`ray dashboard cluster/aws.yaml`
# or `kubectl port-forward svc/refseg-head-svc 8265:8265` forwards the head's dashboard there).
# Token (RAY_AUTH_MODE=token is always set): $RAY_AUTH_TOKEN, else the Kubernetes Secret given by
# --k8s-secret (key auth_token), else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (the token
# `ray get-auth-token --generate` wrote and cluster/aws.yaml / gcp.yaml copy to every node).
# The code: your checkout (this script's repository) is uploaded as the job's working_dir with
# cluster/runtime_env.yaml (env vars, excludes); override with --runtime-env FILE.
# Other options before `--` go to `ray job submit` unchanged (--no-wait, --submission-id ID,
# --entrypoint-num-cpus N, ...). Then: ray job logs -f ID / ray job status ID / ray job stop ID
# with the same RAY_ADDRESS, RAY_AUTH_MODE=token and token.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
k8s_secret=""
runtime_env="$repo/cluster/runtime_env.yaml"
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --k8s-secret) k8s_secret="$2"; shift 2 ;;
    --k8s-secret=*) k8s_secret="${1#*=}"; shift ;;
    --runtime-env) runtime_env="$2"; shift 2 ;;
    --runtime-env=*) runtime_env="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "cluster/submit.sh: error: no entrypoint; put the command after '--', e.g. -- python jobs/train.py --config configs/debug.yaml" >&2
  exit 2
fi
if [[ ! -f "$runtime_env" ]]; then
  echo "cluster/submit.sh: error: runtime_env file '$runtime_env' does not exist; pass --runtime-env FILE" >&2
  exit 2
fi
runtime_env="$(cd "$(dirname "$runtime_env")" && pwd)/$(basename "$runtime_env")"  # we cd below

export RAY_AUTH_MODE=token
if [[ -z "${RAY_AUTH_TOKEN:-}" && -n "$k8s_secret" ]]; then
  RAY_AUTH_TOKEN="$(kubectl get secret "$k8s_secret" -o jsonpath='{.data.auth_token}' | base64 -d)" || RAY_AUTH_TOKEN=""
  if [[ -z "$RAY_AUTH_TOKEN" ]]; then
    echo "cluster/submit.sh: error: could not read key auth_token of Kubernetes Secret '$k8s_secret'; check the name and your kubectl context/namespace" >&2
    exit 2
  fi
  export RAY_AUTH_TOKEN
fi
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
  token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [[ ! -s "$token_file" ]]; then
    echo "cluster/submit.sh: error: no Ray auth token: set RAY_AUTH_TOKEN, pass --k8s-secret NAME, or put the cluster's token in $token_file (ray get-auth-token --generate before ray up)" >&2
    exit 2
  fi
fi

ray_bin="${RAY:-ray}"
cd "$repo"  # runtime_env.yaml's working_dir "." is the repository root
echo "submitting to $address: $*" >&2
exec "$ray_bin" job submit --address "$address" --runtime-env "$runtime_env" ${extra[@]+"${extra[@]}"} -- "$@"
