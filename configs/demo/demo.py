"""`bana demo`: the whole method on the embedded synthetic dataset, CPU, a few minutes.

The top-level config is stage 1's (configs/demo/stage1.py) with `stage = 'demo'`; bana_jax.demo
takes the stage-2 and stage-3 settings from configs/demo/stage2.py and stage3.py beside this file
(load them with bana_jax.train.config.load_config). Overrides on the command line apply to the
top-level config, e.g. `bana demo --config.train.num_steps=50`.
"""

import importlib.util
from pathlib import Path


def get_config():
    spec = importlib.util.spec_from_file_location(
        "bana_demo_stage1", Path(__file__).with_name("stage1.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.stage = "demo"
    return config
