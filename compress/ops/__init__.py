"""Pure tensor math: no I/O, no configs, no logging."""
