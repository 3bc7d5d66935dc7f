"""Device placement: where arrays go on a mesh, derived from the arrays they belong with.

`factor_shardings` gives an adapter's factors shardings derived from its base weight's, so
an adapter loaded onto a sharded base is sharded the same way.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from .weight import Layout


def factor_shardings(base: Any, layout: Layout) -> tuple[Any, Any, Any]:
    """Shardings for ``A``, ``B`` and DoRA's ``m`` derived from the base weight's sharding.

    A `NamedSharding` carries over axis by axis: ``A`` takes the weight's spec of
    the stacked and fan-in axes (rank axis unsharded), ``B`` and ``m`` that of the
    stacked and fan-out axes. A single-device base gives single-device factors; other
    multi-device shardings give factors replicated on the same devices.
    """
    sharding = getattr(base, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (base.ndim - len(sharding.spec))
        pick = lambda axes: tuple(spec[i] for i in axes)
        stack = pick(layout.stack)
        a_spec = PartitionSpec(*stack, *pick(layout.fan_in), None)
        b_spec = PartitionSpec(*stack, None, *pick(layout.fan_out))
        m_spec = PartitionSpec(*stack, *pick(layout.fan_out))
        return tuple(NamedSharding(sharding.mesh, s) for s in (a_spec, b_spec, m_spec))
    if sharding is None or isinstance(sharding, SingleDeviceSharding):
        single = same_shape_sharding(base)
        return single, single, single
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    replicated = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec())
    return replicated, replicated, replicated


def same_shape_sharding(base: Any) -> Any:
    """The base leaf's sharding (for a value of its shape), or the default device."""
    sharding = getattr(base, "sharding", None)
    return sharding if sharding is not None else SingleDeviceSharding(jax.devices()[0])
