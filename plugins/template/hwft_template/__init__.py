"""A minimal hwft device plugin: copy this folder, rename, and point DEVICE at your torch device."""
