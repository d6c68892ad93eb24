"""Experiment entry point: `python run.py experiment=testbed_hicache` (see README and conf/)."""

import sys

import hydra
from omegaconf import DictConfig

from hicache.app.main import check_launcher, main, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def run(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    check_launcher(sys.argv[1:])
    run()
