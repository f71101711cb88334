"""Running one batch on several engine replicas: the pure planning half (bins, resources, stats)
imports neither torch nor Ray; `ray_runner` and `ray_replica` (the `ray` extra) do the running."""
