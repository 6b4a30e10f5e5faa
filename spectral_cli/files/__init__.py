"""Checkpoint files: one module per format owning its reader and its writer (:mod:`.torch_file`,
:mod:`.safetensors_io`, :mod:`.shards`, :mod:`.dcp`, :mod:`.model_dir`), found through one table
(:mod:`.registry`) after :mod:`.formats` detects the format; the types they share (:mod:`.checkpoint`); one way
for an output to reach its name (:mod:`.atomic`, through the system calls of :mod:`.syscalls`), every written value
read back (:mod:`.verify`); and the operations built on them: convert and bake (:mod:`.convert`), inspect
(:mod:`.listing`), load (:mod:`.load`).
"""
