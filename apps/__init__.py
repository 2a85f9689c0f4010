"""mlx_sd_apps: what people run on top of the library: the `mlx-sd` CLI and the local HTTP server."""
