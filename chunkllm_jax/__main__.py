from chunkllm_jax.cli import main

main()
