"""State dicts without the model class: keys and tensor specs (:mod:`.keys`), the records a converted checkpoint
keeps (:mod:`.records`), the plans of convert and bake (:mod:`.plan`) and their execution (:mod:`.surgery`).
``keys``, ``records`` and ``plan`` import no torch: ``spectral inspect`` lists a safetensors file with them alone.
"""
