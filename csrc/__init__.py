"""C++/CUDA sources of the ltcl_fused extension (package data; compiled on first use by ltcl_fused.ext)."""
