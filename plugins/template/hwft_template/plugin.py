"""A device plugin in one module. It registers one backend, ``template``, that runs hwft's torch
engine on the torch device ``DEVICE`` (``cpu`` here, so this template trains anywhere). For your
device:

1. set ``DEVICE`` to your torch device type (``torch.<DEVICE>`` must exist: ``xpu``, ``npu``, ...);
2. make :func:`probe` answer from your runtime: cheap, no side effects, and a reason when no;
3. make :func:`capability` claim only what passes the conformance suite
   (``hwft plugins check template``), and nothing else;
4. rename the backend, the module and the distribution.
"""

from __future__ import annotations

import importlib.util

import pluggy

from hwft.records import Availability, Backend, Capability

#: The plugin API this module was written for (hwft refuses a plugin of another major version).
HWFT_PLUGIN_API = "2.0"
hookimpl = pluggy.HookimplMarker("hwft")

DEVICE = "cpu"
#: Below the built-in CPU backend (100): ``backend: auto`` never picks the template.
PRIORITY = 10


def probe() -> Availability:
    """Is the device here? Called lazily and cached by hwft; import heavy things here, not at
    module import, and never initialise the device for good."""
    if importlib.util.find_spec("torch") is None:
        return Availability(False, "torch is not installed")
    return Availability(True, devices=({"name": f"template on {DEVICE}"},))


def capability() -> Capability:
    """What the backend runs: the conformance suite trains every claimed cell and checks that
    every other one is refused."""
    return Capability(
        methods={"sft": ("full", "lora"), "cpt": ("full", "lora")},
        dtypes=("fp32",),
        attention=("eager", "sdpa"),
        collective="gloo",
        packing=True,
        notes={"qlora": "the template quantises nothing"},
    )


def _runtime():
    from hwft_torch.runtime import DeviceRuntime

    return DeviceRuntime(DEVICE)


def train(job):
    return _runtime().train(job)


def inference(trained, precision: str = "auto"):
    return _runtime().inference("template")(trained, precision)


@hookimpl
def hwft_register_backends(register):
    register(
        Backend(
            "template",
            "torch",
            "the device plugin template (torch on the CPU)",
            PRIORITY,
            probe,
            capability,
            train,
            inference=inference,
        )
    )
