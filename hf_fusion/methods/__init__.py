"""Built-in fusion methods; importing this package registers each of them."""

from hf_fusion.methods import (  # noqa: F401
    dare,
    expo,
    linear_interpolation,
    simple_average,
    slerp,
    task_arithmetic,
    ties_merging,
    weighted_average,
)
