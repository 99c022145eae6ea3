"""Using what was trained: ``hwft chat``, ``hwft serve``, ``hwft eval`` and ``hwft export``,
each on top of :mod:`hwft.inference` (a trained model loaded on a backend)."""
