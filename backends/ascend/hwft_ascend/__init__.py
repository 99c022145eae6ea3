"""The Ascend NPU device for hwft's torch engine (distribution ``hwft-ascend``)."""
