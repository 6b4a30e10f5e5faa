"""Checkpoint files: one source per format (:mod:`.torch_file`, :mod:`.safetensors_io`, :mod:`.shards`, opened
by :mod:`.sources` after :mod:`.formats` detects the format), one writer per format, one way for an output to
reach its name (:mod:`.atomic`, through the system calls of :mod:`.syscalls`), and the operations built on them:
convert and bake (:mod:`.convert`), inspect (:mod:`.inspect`).
"""
