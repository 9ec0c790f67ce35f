"""The built-in GLiT search spaces, shipped inside the package as glit_ray.search_spaces."""
