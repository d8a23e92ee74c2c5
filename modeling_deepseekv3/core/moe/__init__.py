"""DeepSeekMoE: router, routed experts, dispatch (the expert-parallel seam), and the reference twin."""

from .dispatch import DispatchPlan, LocalDispatcher
from .experts import RoutedExperts
from .layer import DeepseekV3MoE
from .reference import moe_reference
from .router import Routing, TopkRouter, route_tokens

__all__ = [
    "DeepseekV3MoE",
    "DispatchPlan",
    "LocalDispatcher",
    "RoutedExperts",
    "Routing",
    "TopkRouter",
    "moe_reference",
    "route_tokens",
]
