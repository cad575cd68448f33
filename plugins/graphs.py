"""Built-in teacher graphs (design section 1): none, ipkd, ipkd-ta-1, ipkd-ta-m, subset."""

from __future__ import annotations

from typing import Any

from kdreg import graph
from kdreg.hookspecs import hookimpl


@hookimpl
def kdreg_register_graphs(register: Any) -> None:
    register("none", graph.no_distillation)
    register("ipkd", graph.ipkd)
    register("ipkd-ta-1", graph.ipkd_ta_1)
    register("ipkd-ta-m", graph.ipkd_ta_m)
    register("subset", graph.subset)
