"""Data: files -> rows -> conversations -> token ids with label masks. Engine-neutral."""
