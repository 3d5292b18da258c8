"""Pallas kernels for ChunkLLM. Each module holds a kernel, its jnp reference with the same
arguments, and a dispatcher named like the module (see dispatch.py):

  from pallas_kernels.chunk_decode_attention import chunk_decode_attention

Nothing is re-exported here: a function named like its module would shadow the module.
"""
