"""hwft's torch engine: the cpu, cuda and rocm devices. Imports no torch until asked to."""
