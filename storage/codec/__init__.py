"""The cache's column layouts (format versions 2 and 3) and log-prob quantisation: arrays in, arrays out, no I/O."""
