"""hwft-lsft: supervised fine-tuning with label smoothing, an out-of-tree hwft method."""
