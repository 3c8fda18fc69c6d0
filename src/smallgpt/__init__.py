"""smallgpt: train small GPT language models from scratch, sample, chat, score and classify.

The Python API (docs/python-api.md): `load(source)` -> a Model with generate, stream, score and
chat; `train(config, **overrides)` -> the run folder; `prepare(source, out, **options)` -> the
data folder.
"""

# `smallgpt.train` is the function below, while the training code lives in the package of the same
# name: import that package first, because Python binds a subpackage to its parent's attribute only
# when it first loads it; later imports of smallgpt.train.* then leave the function in place.
import smallgpt.train as _training_package  # noqa: F401
from smallgpt.api import Model, load, prepare, train

__version__ = "0.1.0"
__all__ = ["Model", "load", "prepare", "train"]
