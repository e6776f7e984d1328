# GPU + Jupyter image for gbm-pcnsl. The base image's TensorFlow must equal the version
# pinned in requirements.txt (tests/test_packaging.py checks it).
FROM tensorflow/tensorflow:2.21.0-gpu-jupyter

WORKDIR /tf/gbm-pcnsl
COPY requirements.txt .
# TensorFlow (with its CUDA libraries) comes from the base image; install the rest.
RUN grep -v '^tensorflow==' requirements.txt > /tmp/requirements-no-tf.txt \
    && pip install --no-cache-dir -r /tmp/requirements-no-tf.txt \
    && python -c "import tensorflow as tf; assert tf.__version__ == '2.21.0', tf.__version__"
COPY . .

# Same default command as the base image: Jupyter on port 8888, notebooks under /tf.
EXPOSE 8888
CMD ["bash", "-c", "source /etc/bash.bashrc && jupyter notebook --notebook-dir=/tf --ip 0.0.0.0 --no-browser --allow-root"]
