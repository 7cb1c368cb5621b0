# The image of every Ray node (KubeRay head and workers, cluster launcher): Ray's GPU image + t2v.
#   docker build -t ghcr.io/t2v-project/t2v:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /app
# CUDA torch first (the image has CUDA 12), so t2v's `torch` requirement is already met.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126
COPY pyproject.toml README.md ./
COPY t2v ./t2v
RUN pip install --no-cache-dir .
COPY jobs ./jobs
COPY serve_configs ./serve_configs
ENV PYTHONUNBUFFERED=1
