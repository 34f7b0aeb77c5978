"""flashlm's Triton kernels, one subpackage per op. Imported as ``flashlm.kernels``."""
