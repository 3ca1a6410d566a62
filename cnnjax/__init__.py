"""cnnjax: convolutional networks in pure-functional JAX/Flax, verified against PyTorch.

>>> import cnnjax
>>> model = cnnjax.get_model('resnet18', num_classes=10)
>>> table = cnnjax.summary(model, (1, 224, 224, 3))   # prints the table, returns a Summary

Submodules: layers, reference, shapes, blocks, models, data, optim, train, runner, parallel,
checkpoint, transfer, viz. `import cnnjax` does not import TensorFlow or PyTorch, and changes no
process-wide setting: `cnnjax.configure_cpu()`, called before the first JAX computation, opts in
to cnnjax's XLA:CPU flags, a bounded compilation cache and malloc that keeps freed memory
(cnnjax/runtime.py; run.py calls it).
"""
from cnnjax import layers
from cnnjax.models import activations, get_model, model_names
from cnnjax.runtime import configure_cpu
from cnnjax.summary import summary
from cnnjax.zoo import pretrained

__version__ = '0.1.0'
__all__ = ['layers', 'get_model', 'model_names', 'activations', 'summary', 'configure_cpu',
           'pretrained']
