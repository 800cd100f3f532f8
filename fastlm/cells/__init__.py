"""Recurrent-stack backends behind one interface, keyed by (cell, backend).

    layer = cells.build(cell="gru", backend="cudnn", input_size=E, hidden_size=H, num_layers=L, dropout=p)
    y, state = layer(x, state)

``registered()`` lists every (cell, backend) pair, ``available()`` those that run on this machine. An unknown or
unavailable key raises FastlmError listing the alternatives: there is never a silent fallback to another backend.
"""

from fastlm.cells.registry import (
    BACKENDS,
    CELLS,
    available,
    build,
    check_runs_on,
    register,
    registered,
    runs_as,
    unavailable_reason,
    variants,
)

__all__ = ["CELLS", "BACKENDS", "available", "build", "check_runs_on", "register", "registered", "runs_as",
           "unavailable_reason", "variants"]
