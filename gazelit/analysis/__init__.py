"""Analyses of trained or tiny GazeVLMs: attention cost per decoding step (cost), dense attention maps
through the GazeContext probe hook (probes), and gaze-head discovery (gaze_heads, comic_strips).

Nothing here changes the attention core: maps are computed from the post-RoPE queries and keys the probe
hook receives after every gaze attention call.
"""
