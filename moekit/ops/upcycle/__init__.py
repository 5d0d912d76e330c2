"""`moekit upcycle`: dense checkpoint -> MoE checkpoint (plan, experts, routers, writing)."""

from moekit.ops.upcycle.plan import UpcycleOptions, UpcyclePlan, plan_upcycle
from moekit.ops.upcycle.run import output_tensors, prepare, summarize, upcycle
from moekit.ops.upcycle.types import Prepared, UpcycleReport

__all__ = ["Prepared", "UpcycleOptions", "UpcyclePlan", "UpcycleReport", "output_tensors",
           "plan_upcycle", "prepare", "summarize", "upcycle"]
