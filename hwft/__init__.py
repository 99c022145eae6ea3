"""hwft: one fine-tuning recipe, run by whichever device backend this machine has.

The core package is engine-neutral: importing it never imports torch or mlx, so recipe
validation and error messages are fast. Engines live in backends, found through plugins.
"""

__version__ = "0.1.0"

#: Version of the plugin API (hookspecs and the records in :mod:`hwft.records`).
#: A plugin declares the version it was written against as ``HWFT_PLUGIN_API`` in its module;
#: it loads when the major numbers match and its minor number is not above this one.
HWFT_PLUGIN_API = "2.2"  # frozen: see plugins/API.md (hooks, records, the compatibility rule, changelog)
