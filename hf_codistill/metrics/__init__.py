"""`evaluate` metric modules shipped inside hf_codistill: `evaluate.load(metric_path("accuracy"))` works offline."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def metric_path(name: str) -> str:
    """Path of a metric module shipped with the package, for `evaluate.load`."""
    path = os.path.join(_HERE, name, f"{name}.py")
    if not os.path.isfile(path):
        available = sorted(d for d in os.listdir(_HERE) if os.path.isdir(os.path.join(_HERE, d)) and d[0] != "_")
        raise ValueError(f"No shipped metric {name!r}; available: {', '.join(available)}.")
    return path
