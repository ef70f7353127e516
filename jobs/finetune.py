"""Ray job entrypoint for `latent-pipeline finetune`: python jobs/finetune.py --config jobs/configs/finetune.yaml"""

from _entry import run  # jobs/ is on sys.path when this file runs as a script

run("finetune")
