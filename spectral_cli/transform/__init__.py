"""The math of the spectral parametrization, with no I/O: the bases by name and their shapes (:mod:`.kernels`,
no torch), the basis matrices (:mod:`.matrices`), ``to_spectral``/``to_spatial`` (:mod:`.bases`), tensors
transformed a slab at a time in bounded memory (:mod:`.slabs`), the training forward (:mod:`.synthesis`) and
the energy profile of ``spectral inspect`` (:mod:`.spectrum`).
"""
