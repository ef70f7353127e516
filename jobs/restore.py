"""Ray job entrypoint for `latent-pipeline restore`: python jobs/restore.py --config jobs/configs/restore.yaml"""

from _entry import run  # jobs/ is on sys.path when this file runs as a script

run("restore")
