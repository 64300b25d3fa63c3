"""craft_ray."""
