"""glit_ray: GLiT global/local vision-transformer architecture search on Ray Tune.

Importing the package registers the GLiT models with timm.
"""
from glit_ray.core.errors import UserError
from glit_ray.models.arch import Architecture, Block
from glit_ray.models.cost import Cost, arch_cost
from glit_ray.models.export import load_model
from glit_ray.models.glit import GLiT
from glit_ray.models.space import SearchSpace

__all__ = ["Architecture", "Block", "Cost", "GLiT", "SearchSpace", "UserError", "arch_cost", "load_model"]
