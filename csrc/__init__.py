"""C++/CUDA sources of the multi-tensor ops, shipped as package data (built by unlearn_fast/ops/_cpp.py)."""
