"""Every setting of a run, as data: the config sections, their checks, the presets, and
how they are layered into one config."""
