"""hwft-xpu: Intel GPUs (torch.xpu) for hwft, registered only through its entry point."""
