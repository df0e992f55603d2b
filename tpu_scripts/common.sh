# Shared settings for the TPU scripts; override any of them in the environment.
: "${TPU_NAME:=jaxft}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR_TYPE:=v4-8}"
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"
: "${REPO_URL:=}"            # git URL of this repository, cloned on every worker
: "${REMOTE_DIR:=jaxft}"
