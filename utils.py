"""Everything the notebook needs besides the models, in one import.

The code lives in modules named for what they hold:

- :mod:`mnist`: ``load_mnist``, ``load_fashion_mnist``, ``read_idx``, ``LabelledImages``, ``DatasetFileError``
- :mod:`training`: ``train_lockstep``, ``BatchSampler``, ``History``, ``NonFiniteLossError``, ``CheckpointError``, ``pick_device``
- :mod:`plotting`: ``draw``, ``draw_runs``, ``ewm_mean``

Typical use::

    import utils
    train, test = utils.load_mnist()
    history = utils.train_lockstep({"ResNet": resnet, "Stochastic": stochastic}, train, test,
                                   iterations=2000, batch_size=400)
    utils.draw(history["ResNet"]["test_acc"], "ResNet",
               history["Stochastic"]["test_acc"], "Stochastic", window=20, type_data="accuracy")
"""

from mnist import DatasetFileError, LabelledImages, load_fashion_mnist, load_mnist, read_idx
from plotting import draw, draw_runs, ewm_mean
from training import METRICS, BatchSampler, CheckpointError, History, NonFiniteLossError, pick_device, train_lockstep

__all__ = [
    "METRICS",
    "BatchSampler",
    "CheckpointError",
    "DatasetFileError",
    "History",
    "NonFiniteLossError",
    "LabelledImages",
    "draw",
    "draw_runs",
    "ewm_mean",
    "load_fashion_mnist",
    "load_mnist",
    "pick_device",
    "read_idx",
    "train_lockstep",
]
