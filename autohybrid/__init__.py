"""autohybrid: per-layer low-rank + sparse compression of trained vision networks.

The pipeline: model -> inventory -> sensitivity -> search -> allocation file -> apply ->
fine-tune -> export. Every stage is a function here and a subcommand of the CLI.
"""

from autohybrid.allocation import Allocation
from autohybrid.apply import apply, skeleton
from autohybrid.cost import allocation_cost, cost, layer_cost
from autohybrid.exceptions import AutohybridError
from autohybrid.export import export, export_onnx, load
from autohybrid.inventory import Inventory, LayerInfo, inventory
from autohybrid.methods import METHODS, applicable_methods, get_method, register
from autohybrid.spec import LayerSpec

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "AutohybridError",
    "Inventory",
    "LayerInfo",
    "LayerSpec",
    "METHODS",
    "allocation_cost",
    "apply",
    "cost",
    "export",
    "export_onnx",
    "get_method",
    "inventory",
    "layer_cost",
    "load",
    "register",
    "applicable_methods",
    "skeleton",
]
