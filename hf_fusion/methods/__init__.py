"""Built-in fusion methods; importing this package registers each of them."""

from hf_fusion.methods import (  # noqa: F401
    breadcrumbs,
    dare,
    della,
    emr_merging,
    expo,
    karcher,
    linear_interpolation,
    magmax,
    model_stock,
    simple_average,
    slerp,
    subspace,
    tall_masks,
    task_arithmetic,
    ties_merging,
    weighted_average,
    wudi,
)
