"""Keeps jax from starting libtpu as a backend on a machine without TPU chips."""

from __future__ import annotations

import glob
import os


def avoid_tpu_probe() -> None:
    """On a machine without TPU chips, keeps jax from starting libtpu as a backend.

    With JAX_PLATFORMS unset jax tries every backend it knows; libtpu (installed for the planner's
    TPU compiler) then logs host-bound and worker-hostname errors before giving up. The planner
    loads libtpu itself (jax.experimental.topologies), so --mode=plan still compiles for TPUs, and
    a TPU VM (chips on PCI, /dev/accel*, /dev/vfio) or JAX_PLATFORMS / JAX_FORCE_TPU_INIT keep jax's
    own choice.
    """
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    try:  # jax 0.10 has no public switch for this; another version keeps its own behaviour
        from jax._src import hardware_utils, xla_bridge

        if hardware_utils.num_available_tpu_chips_and_device_id()[0] or \
                xla_bridge.backends_are_initialized():
            return
        registration = xla_bridge._backend_factories.get("tpu")
    except (ImportError, AttributeError):
        return
    if registration is not None:  # still registered: "tpu" stays a known platform for lowerings
        registration.factory = _no_tpu


def _no_tpu():
    raise RuntimeError("no TPU chips on this machine, so libtpu is not started as a backend")
