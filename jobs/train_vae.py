"""Ray job entrypoint for `latent-pipeline train-vae`: python jobs/train_vae.py --config jobs/configs/train_vae.yaml"""

from _entry import run  # jobs/ is on sys.path when this file runs as a script

run("train-vae")
