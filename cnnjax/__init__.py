"""cnnjax: convolutional networks in pure-functional JAX/Flax, verified against PyTorch.

>>> import cnnjax
>>> model = cnnjax.get_model('resnet18', num_classes=10)
>>> table = cnnjax.summary(model, (1, 224, 224, 3))   # prints the table, returns a Summary

Submodules: layers, reference, shapes, blocks, models, data, optim, train, runner, parallel,
checkpoint, transfer, viz. `import cnnjax` does not import TensorFlow or PyTorch.
"""
from cnnjax import runtime as _runtime

_runtime.configure_cpu()  # XLA:CPU flags + compilation cache: must run before JAX starts a backend

from cnnjax import layers  # noqa: E402
from cnnjax.models import activations, get_model, model_names  # noqa: E402
from cnnjax.summary import summary  # noqa: E402
from cnnjax.zoo import pretrained  # noqa: E402

__version__ = '0.1.0'
__all__ = ['layers', 'get_model', 'model_names', 'activations', 'summary', 'pretrained']
