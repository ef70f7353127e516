"""Ray job entrypoint for `latent-pipeline encode`: python jobs/encode.py --config jobs/configs/encode.yaml"""

from _entry import run  # jobs/ is on sys.path when this file runs as a script

run("encode")
