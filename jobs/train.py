"""Ray job entrypoint for `latent-pipeline train`: python jobs/train.py --config jobs/configs/train.yaml"""

from _entry import run  # jobs/ is on sys.path when this file runs as a script

run("train")
