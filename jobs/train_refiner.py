"""Ray job entrypoint for `latent-pipeline train-refiner`:
python jobs/train_refiner.py --config jobs/configs/train_refiner.yaml"""

from _entry import run  # jobs/ is on sys.path when this file runs as a script

run("train-refiner")
