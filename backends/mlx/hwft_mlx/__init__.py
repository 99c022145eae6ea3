"""hwft's MLX engine: the same recipes as the torch engine, on mlx and mlx-lm."""
