# GPU + Jupyter image for gbm-pcnsl. The base image's TensorFlow must equal the version
# pinned in requirements.txt (tests/test_packaging.py checks it).
# Pinned by tag only: pin it by digest (FROM tensorflow/tensorflow:2.21.0-gpu-jupyter@sha256:...,
# from `docker buildx imagetools inspect tensorflow/tensorflow:2.21.0-gpu-jupyter`) where a
# build must be reproducible; no digest is written here that has not been checked.
FROM tensorflow/tensorflow:2.21.0-gpu-jupyter

# Not root: a process in the container that is tricked into writing writes only as this user.
RUN useradd --create-home --uid 1000 --shell /bin/bash gbmpcnsl \
    && mkdir -p /tf/gbm-pcnsl && chown gbmpcnsl:gbmpcnsl /tf /tf/gbm-pcnsl
WORKDIR /tf/gbm-pcnsl
COPY requirements.txt .
# TensorFlow (with its CUDA libraries) comes from the base image; install the rest.
RUN grep -v '^tensorflow==' requirements.txt > /tmp/requirements-no-tf.txt \
    && pip install --no-cache-dir -r /tmp/requirements-no-tf.txt \
    && python -c "import tensorflow as tf; assert tf.__version__ == '2.21.0', tf.__version__"
# Only the code, notebooks and docs (.dockerignore is an allowlist: no data, no checkpoints).
COPY --chown=gbmpcnsl:gbmpcnsl . .
USER gbmpcnsl

# Same default command as the base image: Jupyter on port 8888, notebooks under /tf. Publish
# it on the host's loopback only: docker run -p 127.0.0.1:8888:8888 (docs/deployment.md).
EXPOSE 8888
CMD ["bash", "-c", "source /etc/bash.bashrc && jupyter notebook --notebook-dir=/tf --ip 0.0.0.0 --no-browser"]
