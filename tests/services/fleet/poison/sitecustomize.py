"""A poisoned fleet member, for tests only: on PYTHONPATH of one host's SuperNode (and so of its
ClientApp), it wraps app.services.fleet.learning.local_update when that module is imported, so the
host sends its honestly trained weights scaled x100 plus random noise, and claims a billion windows."""
import importlib.abc
import importlib.util
import os
import sys

TARGET = "app.services.fleet.learning"


def poison(module) -> None:
    import numpy as np
    real = module.local_update

    def local_update(node_config, weights, shape):
        trained, _ = real(node_config, weights, shape)
        rng = np.random.default_rng(666)
        return [(w * 100 + rng.normal(0.0, 1.0, w.shape)).astype(w.dtype) for w in trained], 10 ** 9
    module.local_update = local_update


class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            poison(module)
        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("PW_TEST_POISON") == "1":
    sys.meta_path.insert(0, Hook())
