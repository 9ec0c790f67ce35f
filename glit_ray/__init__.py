"""glit_ray: GLiT global/local vision-transformer architecture search on Ray Tune.

Importing the package registers the GLiT models with timm.
"""
from .arch import Architecture, Block
from .cost import Cost, arch_cost
from .errors import UserError
from .export import load_model
from .model import GLiT
from .space import SearchSpace

__all__ = ["Architecture", "Block", "Cost", "GLiT", "SearchSpace", "UserError", "arch_cost", "load_model"]
