"""Run-time side of kvgen: load cubins, allocate caches, build TMA descriptors, launch kernels.

Nothing here touches the CUDA driver at import time.
"""
