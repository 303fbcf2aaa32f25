r"""gradcore: backpropagation kernels written once against the Python array API.

Each loss and layer is a forward map ``f`` and its vector-Jacobian product ``f_vjp``;
the same code runs on NumPy, CuPy, PyTorch, JAX, Dask and array-api-strict arrays, and
backends with a faster native version (fused NumPy passes, CUDA kernels) take it
automatically. See ``docs/backprop.md`` for the math.
"""

from . import activations as _activations
from . import jacobian as _jacobian
from . import linear as _linear
from . import linear_xent as _linear_xent
from . import losses as _losses
from ._dispatch import (
    dispatchable,
    get_num_threads,
    register_fast_path,
    set_num_threads,
    use_fast_paths,
)
from ._namespace import (
    BACKEND_NAMES,
    Backend,
    available_backends,
    backend,
    backend_name,
    get_namespace,
    to_numpy,
)
from .activations import *  # noqa: F403
from .jacobian import *  # noqa: F403
from .linear import *  # noqa: F403
from .linear_xent import *  # noqa: F403
from .losses import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "__version__",
    "available_backends",
    "backend",
    "backend_name",
    "dispatchable",
    "get_namespace",
    "get_num_threads",
    "register_fast_path",
    "set_num_threads",
    "to_numpy",
    "use_fast_paths",
    *_activations.__all__,
    *_jacobian.__all__,
    *_linear.__all__,
    *_linear_xent.__all__,
    *_losses.__all__,
]


def __getattr__(name: str) -> object:
    # The training stack (nn, optim, data, fit) is imported on first use so that
    # `import gradcore` and the pytest plugin stay light.
    import importlib

    if name in ("nn", "optim", "data", "train", "cli", "testing", "distributed"):
        return importlib.import_module(f".{name}", __name__)
    if name in ("fit", "History"):
        train = importlib.import_module(".train", __name__)
        return getattr(train, name)
    raise AttributeError(f"module 'gradcore' has no attribute {name!r}")
