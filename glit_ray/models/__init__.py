"""The model layer: search spaces and architectures, their costs and limits, the GLiT family (timm's registry) and its
supernet, checkpoints and export, scoring a network. It loads without Ray (`tests/test_layout.py`), and imports
nothing from the layers above it."""
