# The image of every Ray node (KubeRay head and workers, cluster launcher): Ray's GPU image + t2v.
#   docker build -t ghcr.io/t2v-project/t2v:0.1.0 .
# The Ray image's version is constraints.txt's ray pin, so the image's Ray is the one t2v was tested with.
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
# torch's CUDA build first, at constraints.txt's version (the image has CUDA 12); t2v's `torch` pin then matches it.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126
COPY t2v ./t2v
# The declared runtime dependencies at the versions of the last green fresh-virtualenv run.
RUN pip install --no-cache-dir -c constraints.txt .
COPY jobs ./jobs
COPY serve_configs ./serve_configs
ENV PYTHONUNBUFFERED=1
