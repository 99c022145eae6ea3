"""Data, engine-neutral: files -> rows -> examples -> token ids with label masks -> rows.

reading (files, via datasets) -> registry (LLaMA-Factory's dataset_info.json) -> formats (row
shapes) -> loading (sources, mixing) -> chat (templates, masks) -> batching (packing, length
grouping) -> pipeline (what an engine iterates); inspect shows it all to the user.
"""
