"""Pipeline stages: what a client's update goes through (clip, weight, quantize, noise, protect) and the layout of the shared vector."""
