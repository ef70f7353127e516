"""Ray job entrypoint for `latent-pipeline shards`: python jobs/shards.py --config jobs/configs/shards.yaml"""

from _entry import run  # jobs/ is on sys.path when this file runs as a script

run("shards")
