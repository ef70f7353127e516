# The image the cluster configs and KubeRay manifests run: Ray's GPU image plus this project.
#   docker build -t registry.example.com/ml/latent-pipeline:0.1.0 . && docker push ...
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pipeline ./pipeline
RUN pip install --no-cache-dir -e ".[cluster]"
COPY --chown=ray:users jobs ./jobs
