"""Running one batch on several engine replicas. `bins`, `resources`, `stats`, `options` and
`replica` import neither Ray nor, at module level, torch; `ray_runner` (the `ray` extra) runs
them on Ray actors."""
