"""`bana demo`: the whole method on the embedded synthetic dataset, CPU, a few minutes.

The top-level config is stage 1's (demo/stage1.py); bana_jax.demo takes the stage-2 and stage-3
settings from demo/stage2.py and stage3.py beside this file. Overrides on the command line apply
to the top-level config, e.g. `bana demo --config.train.num_steps=50`.
"""

from pathlib import Path

from bana_jax.config import load_config


def get_config():
    return load_config(Path(__file__).with_name("stage1.py"))
