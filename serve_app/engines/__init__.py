"""The Enhanced Image and Video Engines: run a request through its chain."""
